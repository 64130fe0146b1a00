# SPDX-License-Identifier: Apache-2.0
"""Training-state checkpoints with orbax-checkpoint: the one checkpoint module.

A training state is a dict such as ``{"adapter_state": ..., "opt_state": ...,
"step": 12, "key": key, "data_position": 4096}``; any pytree values work
(adapter states keyed by path, optax NamedTuple states, typed PRNG keys,
Python ints and floats).

How it is stored: every leaf gets a canonical path (``peftjax.tree``); arrays
are saved by orbax under index keys, and a JSON record lists each leaf's path,
shape, dtype and kind. Typed PRNG keys are stored as their key data plus the
implementation name. Python scalars go into the JSON record.

Restoring needs ``like``: a tree with the target structure (arrays or
``jax.ShapeDtypeStruct``, optionally with a ``sharding``). Its structure gives
back the NamedTuple types of optax states and the typed keys; its shardings
place the restored arrays (so a later restore can target another mesh). A
``like`` whose paths, shapes or dtypes differ from the checkpoint (e.g. a
different rule set) raises a ``ValueError`` that names every difference;
nothing is restored partially.

Sharded state: ``save`` writes sharded ``jax.Array``s as they are (each
process writes the shards it holds; nothing is gathered to one host), and
``restore(..., shardings=...)`` places every array on any mesh: a checkpoint
saved on a ``(2, 4)`` mesh restores on ``(8, 1)``, on one device or on another
host count, since orbax reads each target shard's slice from the stored
global array. The shardings come from ``peftjax.shard`` (``param_shardings``,
``adapter_shardings``, ``state_shardings`` for the new mesh); typed PRNG keys
are replicated on the mesh of the sharding given for them.

Scale and main-job issues extend this module (sharded state, resume on
signal); they do not fork it.

Resume on signal: orbax saves are asynchronous and a signal handler must not
write a checkpoint itself, so :class:`SignalFlag` only records SIGTERM/SIGINT;
the training loop polls it between steps, saves, and exits::

    with checkpoint.SignalFlag() as stop:
        for step in range(start, total):
            state = train_step(state)
            if stop or step % every == 0:
                checkpoint.save(directory, step, state)
            if stop:
                break

Damaged checkpoints: a disk that fills up, a copy cut short or a stray
``rm`` can leave a step that orbax still lists. ``restore`` checks the step
before reading it (the JSON record parses, every stored array is listed,
every file the array store refers to is there in full, and every stored
byte can be read back) and raises one :class:`CheckpointError` naming the
directory, the step and the damaged file. Not detected: a bit flipped
*inside* an array's compressed data (the store keeps no checksum of array
contents), which restores as wrong values.
``restore(..., fallback=True)`` skips damaged steps and restores the newest
intact one, with a :class:`CheckpointWarning` naming what it skipped;
``latest_intact_step`` says in advance which step that is, and ``validate``
checks one step. Nothing here writes to, repairs or deletes a damaged step
(docs/checkpoints.md walks through an example)::

    step = checkpoint.latest_intact_step(directory)   # None: nothing to resume
    state = checkpoint.restore(directory, like, step=step)

Exports: ``save``, ``restore``, ``latest_step``, ``latest_intact_step``,
``all_steps``, ``validate``, ``CheckpointError``, ``CheckpointWarning``,
``SignalFlag``.
"""

import os
import signal
import threading
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from peftjax import tree
from peftjax.io._checkpoint_check import ARRAYS as _ARRAYS
from peftjax.io._checkpoint_check import FORMAT as _FORMAT
from peftjax.io._checkpoint_check import META as _META
from peftjax.io._checkpoint_check import CheckpointError as CheckpointError
from peftjax.io._checkpoint_check import CheckpointWarning as CheckpointWarning
from peftjax.io._checkpoint_check import check_step as _validate
from peftjax.io._checkpoint_check import error_file as _error_file
from peftjax.io._checkpoint_check import error_text as _error_text

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "SignalFlag",
    "all_steps",
    "latest_intact_step",
    "latest_step",
    "restore",
    "save",
    "validate",
]


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str)) and not hasattr(x, "dtype")


def _record(path: str, leaf: Any) -> dict[str, Any]:
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        impl = leaf.dtype._impl.name  # works for arrays and ShapeDtypeStruct
        return {"path": path, "kind": "prng_key", "shape": list(data.shape),
                "dtype": str(data.dtype), "impl": impl}
    if _is_scalar(leaf):
        return {"path": path, "kind": "python", "value": leaf,
                "type": type(leaf).__name__}
    if leaf is None:
        return {"path": path, "kind": "none"}
    shape = list(np.shape(leaf))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"checkpoint: leaf {path!r} of type {type(leaf).__name__} is neither an "
            "array, a typed PRNG key nor a Python scalar"
        )
    return {"path": path, "kind": "array", "shape": shape,
            "dtype": np.dtype(dtype).name}


def _manager(directory: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                                 options=options)


def save(directory: str | os.PathLike, step: int, state: Any, *,
         max_to_keep: int | None = None) -> None:
    """Saves a training state as checkpoint ``step`` under ``directory``.

    The save is atomic (orbax writes to a temporary directory and renames)
    and this call waits until it is finished.

    Args:
      directory: the checkpoint root; one sub-directory per step.
      step: the step number (an int >= 0).
      state: a pytree of arrays, typed PRNG keys and Python scalars, e.g.
        ``{"adapter_state": s.trainable, "opt_state": o, "step": 3,
        "key": key}``.
      max_to_keep: keep only this many most recent checkpoints.

    Returns:
      None; the checkpoint is on disk when this returns.

    Raises:
      ValueError: if ``step`` already exists, is older than the latest saved
        step, or is negative.
      TypeError: for a leaf that cannot be stored.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> save(d, 0, {"w": jnp.ones(2), "step": 0})
      >>> latest_step(d)
      0
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save: step must be an int >= 0, got {step!r}")
    flat = tree.flatten(state, is_leaf=lambda x: x is None)
    records = [_record(p, x) for p, x in flat]
    arrays = {}
    for i, ((_, leaf), rec) in enumerate(zip(flat, records, strict=True)):
        if rec["kind"] == "array":
            arrays[f"{i:06d}"] = leaf
        elif rec["kind"] == "prng_key":
            arrays[f"{i:06d}"] = jax.random.key_data(leaf)
    mngr = _manager(os.fspath(directory), max_to_keep)
    try:
        if int(step) in mngr.all_steps():
            raise ValueError(
                f"save: step {step} already exists under {os.fspath(directory)!r}"
            )
        meta = {"format": _FORMAT, "leaves": records}
        latest = mngr.latest_step()
        if latest is not None and int(step) < latest:
            raise ValueError(
                f"save: step {step} is older than the latest saved step {latest} "
                f"under {os.fspath(directory)!r}; checkpoints only move forward"
            )
        items = {_META: ocp.args.JsonSave(meta)}
        if arrays:  # orbax refuses an empty item (a state of Python scalars only)
            items[_ARRAYS] = ocp.args.StandardSave(arrays)
        saved = mngr.save(int(step), args=ocp.args.Composite(**items))
        mngr.wait_until_finished()
        if not saved:
            raise RuntimeError(f"save: orbax declined to save step {step}")
    finally:
        mngr.close()


def _steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    mngr = _manager(directory)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def validate(directory: str | os.PathLike, step: int | None = None) -> int:
    """Checks that checkpoint ``step`` is intact, reading every stored byte once.

    Intact means: the step's JSON record parses and is a peftjax record,
    the array store lists every array the record names with the recorded
    shape, every file the store refers to exists and holds the bytes it
    refers to, and every stored value reads back non-empty. Nothing is
    written or repaired. A bit flipped inside an array's compressed data is
    not detected (the store keeps no checksum of array contents).

    Args:
      directory: the checkpoint root.
      step: the step to check; None for the latest.

    Returns:
      The step that was checked.

    Raises:
      FileNotFoundError: no checkpoint (or no such step) under ``directory``.
      CheckpointError: the step is damaged; names the directory, the step
        and the damaged file.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> save(d, 2, {"w": jnp.ones(3)})
      >>> validate(d)
      2
    """
    root = os.path.abspath(os.fspath(directory))
    steps = _steps(root)
    if not steps:
        raise FileNotFoundError(f"validate: no checkpoint under {root!r}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"validate: no step {step} under {root!r}; steps: {steps}")
    _validate(root, int(step))
    return int(step)


def _newest_intact(root: str) -> tuple[int | None, Any, dict[int, CheckpointError]]:
    """(newest intact step or None, its record, {damaged newer step: error})."""
    damaged: dict[int, CheckpointError] = {}
    for s in reversed(_steps(root)):
        try:
            meta = _validate(root, s)
        except CheckpointError as e:
            damaged[s] = e
            continue
        return s, meta, damaged
    return None, None, damaged


def _compare(saved: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    s = {r["path"]: r for r in saved}
    w = {r["path"]: r for r in want}
    problems = []
    missing = [p for p in w if p not in s]
    extra = [p for p in s if p not in w]
    if missing:
        problems.append(f"  in `like` but not in the checkpoint: {missing[:20]}")
    if extra:
        problems.append(f"  in the checkpoint but not in `like`: {extra[:20]}")
    for p in w:
        if p not in s:
            continue
        a, b = s[p], w[p]
        if a["kind"] != b["kind"]:
            problems.append(f"  {p}: checkpoint has a {a['kind']}, `like` a {b['kind']}")
        elif a["kind"] in ("array", "prng_key") and (
            a["shape"] != b["shape"] or a["dtype"] != b["dtype"]
        ):
            problems.append(
                f"  {p}: checkpoint shape {tuple(a['shape'])} dtype {a['dtype']}, "
                f"`like` shape {tuple(b['shape'])} dtype {b['dtype']}"
            )
    if problems:
        raise ValueError(
            "restore: the checkpoint does not match `like` (was it saved with "
            "another rule set, rank or model?):\n" + "\n".join(problems)
        )


def _abstract(leaf: Any, rec: dict[str, Any], sharding: Any = None
              ) -> jax.ShapeDtypeStruct:
    if sharding is None:
        sharding = getattr(leaf, "sharding", None)
    if rec["kind"] == "prng_key":
        # key data has an extra trailing axis: replicate it on the key's mesh
        mesh = getattr(sharding, "mesh", None)
        sharding = None if mesh is None else jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec())
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(rec["shape"]), np.dtype(rec["dtype"]),
                                sharding=sharding)


def _sharding_list(shardings: Any, like: Any, treedef: Any, n: int) -> list[Any]:
    """One sharding (or None) per leaf of ``like`` from a tree prefix or one value."""
    if shardings is None:
        return [None] * n
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * n
    try:
        full = jax.tree.broadcast(shardings, like, is_leaf=lambda x: x is None)
        out = treedef.flatten_up_to(full)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "restore: shardings must be one jax.sharding.Sharding or a tree prefix "
            f"of `like` with a Sharding (or None) per leaf; it does not fit: {e}"
        ) from None
    for x in out:
        if x is not None and not isinstance(x, jax.sharding.Sharding):
            raise TypeError(
                f"restore: shardings holds {type(x).__name__} {x!r}; expected a "
                "jax.sharding.Sharding or None"
            )
    return out


def restore(directory: str | os.PathLike, like: Any, *, step: int | None = None,
            shardings: Any = None, fallback: bool = False) -> Any:
    """Restores checkpoint ``step`` (default: the latest) into ``like``'s structure.

    The step is checked first (``validate``): a damaged step raises a
    ``CheckpointError`` naming the directory, the step and the damaged file,
    before anything is restored. With ``fallback=True`` (and ``step=None``)
    damaged steps are skipped instead: the newest intact step is restored
    and a ``CheckpointWarning`` names it and every skipped step
    (``latest_intact_step`` returns the same step beforehand). Nothing on
    disk is changed either way.

    Args:
      directory: the checkpoint root given to ``save``.
      like: a tree with the target structure: arrays or
        ``jax.ShapeDtypeStruct`` (with ``sharding`` to place the result),
        typed PRNG keys where keys were saved, and any value where a Python
        scalar was saved. ``jax.eval_shape`` of the state's constructor works.
      step: which step; None for the latest.
      shardings: where to place the arrays, overriding ``like``'s own
        shardings: one ``jax.sharding.Sharding`` for every array, or a tree
        prefix of ``like`` with a ``Sharding`` or None (keep ``like``'s, else
        the first local device) per leaf, e.g. the trees of
        ``peftjax.shard.adapter_shardings`` / ``state_shardings`` built for
        the mesh to restore on, which may differ from the saving mesh.
        Typed PRNG keys are replicated on their sharding's mesh.
      fallback: with ``step=None``, restore the newest *intact* step when
        newer ones are damaged (warning with ``CheckpointWarning``); False:
        a damaged latest step raises.

    Returns:
      The restored tree, with ``like``'s structure and types.

    Raises:
      FileNotFoundError: no checkpoint (or no such step) under ``directory``.
      CheckpointError: the step is damaged (with ``fallback``: every step is).
      ValueError: paths, shapes or dtypes differ from ``like``, all listed;
        ``shardings`` does not fit ``like``; ``fallback`` with a ``step``.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> save(d, 5, {"w": jnp.arange(3.0), "step": 5})
      >>> restore(d, {"w": jnp.zeros(3), "step": 0})
      {'step': 5, 'w': Array([0., 1., 2.], dtype=float32)}
    """
    if fallback and step is not None:
        raise ValueError(f"restore: fallback=True picks the step itself; got step={step} "
                         "(pass step=None, or fallback=False to restore that step)")
    directory = os.path.abspath(os.fspath(directory))
    steps = _steps(directory)  # never creates the directory
    if not steps:
        raise FileNotFoundError(f"restore: no checkpoint under {directory!r}")
    if step is not None and step not in steps:
        raise FileNotFoundError(
            f"restore: no step {step} under {directory!r}; steps: {steps}")
    if step is None and fallback:
        step, meta, damaged = _newest_intact(directory)
        if step is None:
            newest = damaged[max(damaged)]
            raise CheckpointError(
                directory, newest.step, newest.path,
                newest.reason + "; no intact step to fall back to (damaged: "
                + "; ".join(f"step {s}: {e.path}" for s, e in sorted(damaged.items()))
                + ")")
        if damaged:
            warnings.warn(CheckpointWarning(
                f"restore: restored step {step} under {directory!r}, the newest intact "
                f"step; skipped damaged steps {sorted(damaged)}: "
                + "; ".join(f"step {s}: {e.path}: {e.reason}"
                            for s, e in sorted(damaged.items())),
                step=step, skipped=damaged), stacklevel=2)
    else:
        step = int(steps[-1] if step is None else step)
        meta = _validate(directory, step)
    saved = meta["leaves"]
    flat, treedef = jax.tree.flatten_with_path(like, is_leaf=lambda x: x is None)
    like_flat = [(tree.canonical(kp), x) for kp, x in flat]
    placement = _sharding_list(shardings, like, treedef, len(like_flat))
    want = [_record(p, x) for p, x in like_flat]
    _compare(saved, want)
    index = {r["path"]: i for i, r in enumerate(saved)}
    target = {}
    for (p, x), sh in zip(like_flat, placement, strict=True):
        rec = saved[index[p]]
        if rec["kind"] in ("array", "prng_key"):
            target[f"{index[p]:06d}"] = _abstract(x, rec, sh)
    arrays = {}
    if target:
        mngr = _manager(directory)
        try:
            arrays = mngr.restore(step, args=ocp.args.Composite(**{
                _ARRAYS: ocp.args.StandardRestore(target)}))[_ARRAYS]
        except (ValueError, KeyError, OSError) as e:  # damage the check cannot see
            raise CheckpointError(
                directory, step,
                _error_file(e) or os.path.join(directory, str(step), _ARRAYS),
                f"reading the arrays failed: {type(e).__name__}: {_error_text(e)}") from e
        finally:
            mngr.close()
    leaves = []
    for p, _ in like_flat:
        rec = saved[index[p]]
        if rec["kind"] == "array":
            leaves.append(arrays[f"{index[p]:06d}"])
        elif rec["kind"] == "prng_key":
            leaves.append(jax.random.wrap_key_data(arrays[f"{index[p]:06d}"],
                                                   impl=rec["impl"]))
        elif rec["kind"] == "python":
            leaves.append({"int": int, "float": float, "bool": bool,
                           "str": str}[rec["type"]](rec["value"]))
        else:
            leaves.append(None)
    return jax.tree.unflatten(treedef, leaves)


def latest_step(directory: str | os.PathLike) -> int | None:
    """Returns the latest saved step under ``directory``, or None.

    The newest step orbax lists, intact or not; ``latest_intact_step`` skips
    damaged ones.

    Args:
      directory: the checkpoint root.

    Returns:
      The step or None when there is no checkpoint.

    Example:
      >>> import tempfile
      >>> latest_step(tempfile.mkdtemp()) is None
      True
    """
    if not os.path.isdir(os.fspath(directory)):
        return None
    mngr = _manager(os.fspath(directory))
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def latest_intact_step(directory: str | os.PathLike) -> int | None:
    """Returns the newest step under ``directory`` that is intact, or None.

    The step ``restore(directory, like, fallback=True)`` restores. Steps are
    checked newest first with ``validate`` (every stored byte of each checked
    step is read once) until one is intact; nothing is written.

    Args:
      directory: the checkpoint root.

    Returns:
      The step, or None when there is no checkpoint or every step is damaged.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> for s in (1, 2):
      ...     save(d, s, {"w": jnp.zeros(1)})
      >>> with open(os.path.join(d, "2", "meta", "metadata"), "r+") as f:
      ...     _ = f.truncate(10)  # damage step 2's record
      >>> latest_step(d), latest_intact_step(d)
      (2, 1)
    """
    return _newest_intact(os.path.abspath(os.fspath(directory)))[0]


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Returns the saved steps under ``directory`` in increasing order.

    Args:
      directory: the checkpoint root.

    Returns:
      A sorted list (empty when there is no checkpoint).

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> for s in (1, 2):
      ...     save(d, s, {"w": jnp.zeros(1)})
      >>> all_steps(d)
      [1, 2]
    """
    if not os.path.isdir(os.fspath(directory)):
        return []
    mngr = _manager(os.fspath(directory))
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()




class SignalFlag:
    """Context manager that turns termination signals into a flag to poll.

    Inside the ``with`` block, the given signals (default SIGTERM and SIGINT)
    no longer stop the process: their handler only records the signal number.
    The training loop checks ``bool(flag)`` between steps, saves a checkpoint
    with :func:`save` (which waits for orbax's asynchronous write) and
    returns. A second signal while the first is pending restores the
    previous handlers and re-delivers it, so a hung loop can still be stopped
    (a second Ctrl-C raises ``KeyboardInterrupt``). On exit the previous
    handlers are restored.

    Args:
      signals: the signal numbers to catch.

    Attributes:
      received: the first signal number received, or None.

    Raises:
      RuntimeError: entered outside the main thread (Python delivers signals
        to the main thread only).

    Example:
      >>> import os, signal
      >>> with SignalFlag() as flag:
      ...     os.kill(os.getpid(), signal.SIGTERM)
      ...     stopped = bool(flag)
      >>> stopped, flag.received == signal.SIGTERM
      (True, True)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.received is None:
            self.received = signum
            return
        self._restore()  # second signal: fall back to the previous behaviour
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SignalFlag: signals can only be caught in the main thread")
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def __bool__(self) -> bool:
        return self.received is not None
