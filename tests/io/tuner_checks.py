"""Checks every PEFT tuner type's golden test runs (tests/io/test_peft_<name>.py).

The golden directory ``tests/io/golden/peft_<name>/`` is made by
``scripts/golden/peft_<name>_make.py`` (torch side, ``_peft_golden.run``) and
``scripts/golden/peft_<name>_from_peftjax.py`` (peftjax side,
``_peftjax_golden.main``). A test module passes its golden directory (a
``Path(...) / "golden" / ...`` in its own code, so tests/conftest.py marks
it ``golden``) to these functions.

* ``check_peft_made``: PEFT's file loads with PEFT's outputs at the bar,
  materialized and factored (no fallback warning when the tuner claims a
  factored form), folded == PEFT's ``merge_and_unload``; the adapter moves
  the outputs far beyond the bar; the trainable count equals PEFT's.
* ``check_peftjax_written``: the files peftjax writes now are the ones PEFT
  loaded (tensors within ``EXPORT_REL``, same config, the recorded tensor
  statistics), PEFT's outputs with them were within the bar, and they read
  back into peftjax with the same outputs.
* ``check_refused``: config fields peftjax cannot honour are errors naming
  them.
"""

import importlib.util
import json
import pathlib
import sys
import warnings

import jax
import numpy as np
import pytest

from peftjax import adapters, factored, io
from tests.helpers import assert_tensors_close, assert_verified_stats

ROOT = pathlib.Path(__file__).resolve().parents[2]
TORCH_ATOL = 1e-4  # the bar: torch vs peftjax float32 outputs
EXPORT_REL = 1e-5  # regenerated vs committed tensors: NumPy-seeded copies


def _script(name: str):
    path = ROOT / "scripts" / "golden" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_GOLDEN = _script("_peftjax_golden.py")
# the per-tuner scripts import it by name: one module, one cache of models
# and compiled forwards per process
sys.modules.setdefault("_peftjax_golden", _GOLDEN)
load = _GOLDEN.load


def materialized(assignment, params, state) -> dict:
    """``adapters.materialize`` jitted (one small compile, no forward)."""
    return jax.jit(lambda t, f: adapters.materialize(assignment, params, t, f))(*state)


def _mask(kind: str, arr: np.ndarray) -> np.ndarray:
    """BERT's padded positions are not compared (PEFT's either)."""
    if kind != "bert":
        return np.asarray(arr)
    keep = np.asarray(_GOLDEN.BERT_IDS) != 0
    return np.asarray(arr)[keep]


def assert_outputs_close(kind: str, got, want, atol: float = TORCH_ATOL) -> None:
    np.testing.assert_allclose(_mask(kind, got), _mask(kind, want), rtol=0, atol=atol)


def trainable_count(state: adapters.AdapterState) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.trainable))


def check_peft_made(golden: pathlib.Path, name: str, kind: str, *, scanned: bool,
                    paths: tuple[str, ...] = ("materialized", "factored"),
                    fallback: bool = False,
                    roundtrip: pathlib.Path | None = None) -> io.PeftAdapter:
    """PEFT's ``<kind>_<name>`` file gives PEFT's outputs in peftjax.

    Args:
      golden: ``tests/io/golden/peft_<name>``.
      name: the tuner.
      kind: ``"llama"`` or ``"bert"``.
      scanned: load the Llama in the scanned layout.
      paths: which forward paths to check (``"materialized"``,
        ``"factored"``; ``fold`` is checked when PEFT's merged outputs exist).
      fallback: the tuner has no factored form (the factored path then
        materialises with a warning, which is allowed).
      roundtrip: a directory to ``save_peft`` the loaded adapter into (for a
        tuner whose write is exact): the written tensors are PEFT's own, bit
        for bit, and read back to the same adapters and state.

    Returns:
      The loaded ``PeftAdapter``, for method-specific assertions.
    """
    ref = np.load(golden / "torch_outputs.npz")
    counts = json.loads((golden / "peft.json").read_text())["trainable_params"]
    _, params, key_map, fwd = load(kind, scanned=scanned)
    ad = io.load_peft(golden / f"{kind}_{name}", params, key_map=key_map)
    want = ref[f"{kind}_{name}"]
    if roundtrip is not None:  # PEFT -> peftjax -> PEFT keeps PEFT's tensors
        io.save_peft(roundtrip, ad.assignment, ad.state, params, key_map=key_map)
        assert_tensors_close(
            io.read_safetensors(roundtrip / "adapter_model.safetensors")[0],
            io.read_safetensors(golden / f"{kind}_{name}" / "adapter_model.safetensors")[0],
            0.0, f"{kind}_{name} written back")
        back = io.load_peft(roundtrip, params, key_map=key_map)
        assert {p: repr(a) for p, a in back.assignment.items()} == \
            {p: repr(a) for p, a in ad.assignment.items()}
        jax.tree.map(np.testing.assert_array_equal, back.state, ad.state)
    if "materialized" in paths:
        assert_outputs_close(kind, fwd(materialized(ad.assignment, params, ad.state)), want)
    if "factored" in paths:
        with warnings.catch_warnings():
            if not fallback:
                warnings.simplefilter("error")  # the factored path takes no fallback
            else:
                warnings.simplefilter("ignore")
            raw = fwd.__wrapped__  # the forward itself, not its compiled form
            got = jax.jit(lambda t, f: factored.transform(
                lambda p, _: raw(p), ad.assignment, t, f)(params, None))(*ad.state)
        assert_outputs_close(kind, got, want)
    if f"{kind}_{name}_merged" in ref.files:
        merged = jax.jit(lambda t, f: adapters.fold(ad.assignment, params, t, f))(
            *ad.state)
        assert_outputs_close(kind, fwd(merged), ref[f"{kind}_{name}_merged"])
    # the adapter moves the outputs far beyond the bar (no tensor at its init)
    assert np.max(np.abs(_mask(kind, want) - _mask(kind, ref[f"{kind}_base"]))) > \
        100 * TORCH_ATOL
    assert trainable_count(ad.state) == counts[kind]
    return ad


def check_peftjax_written(golden: pathlib.Path, name: str, tmp_path: pathlib.Path,
                          *, read_back: bool = True) -> dict[str, np.ndarray]:
    """The files peftjax writes are the ones PEFT loaded within the bar.

    Returns:
      ``{"pj_<kind>_<name>": peftjax outputs}`` of the regenerated files.
    """
    report = json.loads((golden / "peft.json").read_text())
    committed = golden / "from_peftjax"
    outputs = _script(f"peft_{name}_from_peftjax.py").build(tmp_path)
    old_outputs = np.load(committed / "peftjax_outputs.npz")
    assert sorted(outputs) == sorted(old_outputs.files)
    for d, out in sorted(outputs.items()):
        kind = d.split("_")[1]
        new, _ = io.read_safetensors(tmp_path / d / "adapter_model.safetensors")
        old, _ = io.read_safetensors(committed / d / "adapter_model.safetensors")
        assert_tensors_close(new, old, EXPORT_REL, d)
        assert json.loads((tmp_path / d / "adapter_config.json").read_text()) == \
            json.loads((committed / d / "adapter_config.json").read_text())
        rec = report[d]
        assert rec["max_abs_diff"] <= TORCH_ATOL
        assert_verified_stats(rec["tensor_stats"], old, d)
        drift = float(np.max(np.abs(_mask(kind, out) - _mask(kind, old_outputs[d]))))
        assert drift + rec["max_abs_diff"] <= TORCH_ATOL
        if read_back:  # and peftjax reads its own file back to the same outputs
            _, params, key_map, fwd = load(kind, scanned=kind == "llama")
            back = io.load_peft(tmp_path / d, params, key_map=key_map)
            got = fwd(materialized(back.assignment, params, back.state))
            assert_outputs_close(kind, got, out, atol=1e-5)
    return outputs


def check_refused(golden: pathlib.Path, name: str, tmp_path: pathlib.Path,
                  fields: dict, kind: str = "llama") -> None:
    """Each ``{field: value}`` set in PEFT's config is an error naming it."""
    _, params, key_map, _ = load(kind)
    src = golden / f"{kind}_{name}"
    cfg = json.loads((src / "adapter_config.json").read_text())
    for field, value in fields.items():
        d = tmp_path / field
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        (d / "adapter_model.safetensors").write_bytes(
            (src / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=field):
            io.load_peft(d, params, key_map=key_map)
