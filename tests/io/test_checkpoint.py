"""Checkpoints: bit-exact round trips in a fresh process, clear mismatches."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from peftjax.io import checkpoint
from tests import helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Shared by this process and the fresh subprocess: builds the same structure.
_BUILD = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from peftjax import adapters, tree

    def build(rank=2):
        rng = np.random.default_rng(0)
        params = {
            "attn": {"q": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)},
                     "v": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.bfloat16)}},
            "layers": {"mlp": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)}},
        }
        rules = [tree.Rule(where=r"attn/(q|v)/kernel", then=adapters.dora(rank)),
                 tree.Rule(where=r"layers/mlp/kernel", then=adapters.lora_xs(rank))]
        a = tree.assign(params, rules)
        state = adapters.init(a, jax.random.key(0), params)
        opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
        return params, a, state, opt
''')
exec(_BUILD)  # defines build()


def _trained_state():
    params, a, state, opt = build()  # noqa: F821
    opt_state = opt.init(state.trainable)
    trainable = jax.tree.map(lambda x: x + 0.25, state.trainable)
    with jax.numpy_dtype_promotion("standard"):
        g = jax.tree.map(jnp.ones_like, trainable)
        _, opt_state = opt.update(g, opt_state, trainable)
    return {
        "adapter_state": {"trainable": trainable, "frozen": state.frozen},
        "opt_state": opt_state,
        "step": 17,
        "key": jax.random.fold_in(jax.random.key(3), 5),
        "data_position": 4096,
    }


def test_restore_in_fresh_process_is_bit_exact(tmp_path):
    state = _trained_state()
    checkpoint.save(tmp_path / "ckpt", 17, state)
    expected = {p: np.asarray(jax.random.key_data(x) if p == "key" else x)
                for p, x in tree.flatten(state) if hasattr(x, "dtype")}
    np.savez(tmp_path / "expected.npz", **{k.replace("/", "|"): v
                                          for k, v in expected.items()})
    script = _BUILD + textwrap.dedent(f'''
        import json, numpy as np
        from peftjax.io import checkpoint
        params, a, state, opt = build()
        like = {{
            "adapter_state": {{"trainable": state.trainable, "frozen": state.frozen}},
            "opt_state": jax.eval_shape(opt.init, state.trainable),
            "step": 0, "key": jax.random.key(0), "data_position": 0,
        }}
        r = checkpoint.restore({str(tmp_path / "ckpt")!r}, like)
        exp = np.load({str(tmp_path / "expected.npz")!r})
        bad = []
        for p, x in tree.flatten(r):
            if not hasattr(x, "dtype"):
                continue
            got = np.asarray(jax.random.key_data(x) if p == "key" else x)
            want = exp[p.replace("/", "|")]
            # exact: a save/restore round trip does no arithmetic
            if got.dtype != want.dtype or not np.array_equal(got, want):
                bad.append(p)
        print(json.dumps({{
            "bad": bad,
            "n": len(exp.files),
            "opt_types": [type(s).__name__ for s in r["opt_state"]],
            "inner": [type(s).__name__ for s in r["opt_state"][1]],
            "key_dtype": str(r["key"].dtype),
            "trainable_type": type(r["adapter_state"]["trainable"]["attn/q/kernel"]).__name__,
            "frozen_type": type(r["adapter_state"]["frozen"]["layers/mlp/kernel"]).__name__,
            "step": r["step"], "data_position": r["data_position"],
        }}))
    ''')
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["bad"] == [] and res["n"] == len(expected)
    assert res["opt_types"] == ["EmptyState", "tuple"]
    assert res["inner"] == ["ScaleByAdamState", "EmptyState", "EmptyState"]
    assert res["key_dtype"] == "key<fry>"
    assert res["trainable_type"] == "DoRAParams"
    assert res["frozen_type"] == "LoRAXSBasis"
    assert (res["step"], res["data_position"]) == (17, 4096)


def test_adapter_only_checkpoint_onto_fresh_base(tmp_path):
    params, a, state, _ = build()  # noqa: F821
    trained = jax.tree.map(lambda x: x * 2.0 + 0.1, state.trainable)
    checkpoint.save(tmp_path, 1, {"trainable": trained, "frozen": state.frozen})
    fresh_params, fresh_a, fresh_state, _ = build()  # noqa: F821
    r = checkpoint.restore(tmp_path, {"trainable": fresh_state.trainable,
                                      "frozen": fresh_state.frozen})
    h.assert_tree_allclose(r["trainable"], trained, **h.EXACT)
    merged = adapters.fold(fresh_a, fresh_params, r["trainable"], r["frozen"])
    want = adapters.fold(a, params, trained, state.frozen)
    h.assert_tree_allclose(merged, want, **h.EXACT)


def test_mismatched_rules_or_shapes_fail_clearly(tmp_path):
    _, _, state, _ = build(rank=2)  # noqa: F821
    checkpoint.save(tmp_path, 0, {"trainable": state.trainable})
    _, _, state3, _ = build(rank=3)  # noqa: F821
    with pytest.raises(ValueError) as e:
        checkpoint.restore(tmp_path, {"trainable": state3.trainable})
    msg = str(e.value)
    assert "trainable/attn/q/kernel/a" in msg and "(6, 2)" in msg and "(6, 3)" in msg
    params, _, _, _ = build()  # noqa: F821
    other = tree.assign(params, [tree.Rule(where=r"attn/q/kernel",
                                           then=adapters.dora(2))])
    st = adapters.init(other, jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"not in `like`: \['trainable/attn/v"):
        checkpoint.restore(tmp_path, {"trainable": st.trainable})


def test_steps_and_errors(tmp_path):
    assert checkpoint.latest_step(tmp_path / "none") is None
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_path / "none", {"w": jnp.zeros(1)})
    checkpoint.save(tmp_path, 1, {"w": jnp.ones(1)})
    checkpoint.save(tmp_path, 2, {"w": jnp.full((1,), 2.0)})
    assert checkpoint.all_steps(tmp_path) == [1, 2]
    r = checkpoint.restore(tmp_path, {"w": jnp.zeros(1)}, step=1)
    np.testing.assert_array_equal(np.asarray(r["w"]), [1.0])
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(tmp_path, 2, {"w": jnp.ones(1)})
    with pytest.raises(ValueError, match="older than the latest"):
        checkpoint.save(tmp_path, 0, {"w": jnp.ones(1)})
    with pytest.raises(FileNotFoundError, match="no step 7"):
        checkpoint.restore(tmp_path, {"w": jnp.zeros(1)}, step=7)
    with pytest.raises(TypeError, match="neither an array"):
        checkpoint.save(tmp_path, 3, {"w": object()})


def test_signal_flag_records_and_restores_handlers():
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT)
    with checkpoint.SignalFlag() as flag:
        assert not flag
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    # a second signal falls back to the previous handler (here: KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with checkpoint.SignalFlag() as flag:
                os.kill(os.getpid(), signal.SIGINT)
                assert flag.received == signal.SIGINT
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    errors = []

    def enter():
        try:
            with checkpoint.SignalFlag():
                pass
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]
