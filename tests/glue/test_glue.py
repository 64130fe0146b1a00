"""The training-glue examples of ``docs/glue.md`` run as written (issue 12 item 5).

Each example trains LoRA for a few steps through its framework's utilities
(``nnx.Optimizer(..., wrt=...)``, a Linen ``TrainState``, ``eqx.partition`` +
``eqx.filter_jit``). Checks: the base weights are bit-identical afterwards,
the optimizer holds moments for the adapter only, and the trained adapter
equals ``train.trainer(..., factored=False)`` (the weight-space
``materialize`` path, plain optax) run from the same initial state.
"""

import pathlib
import re

import equinox as eqx
import jax
import numpy as np
import optax

from peftjax import adapters, train
from tests.helpers import GRAD_F32, f64

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "glue.md"


def _sections():
    text = DOC.read_text(encoding="utf-8")
    out = {}
    for part in text.split("\n## ")[1:]:
        title = part.split("\n", 1)[0]
        blocks = re.findall(r"```python\n(.*?)```", part, re.S)
        assert len(blocks) == 1, title
        out[title.split(":")[0].strip()] = blocks[0]
    return out


SECTIONS = _sections()


def _run(name):
    scope: dict = {"__name__": f"glue_{name}"}
    with jax.numpy_dtype_promotion("standard"):  # a user's default setting
        exec(compile(SECTIONS[name], f"docs/glue.md:{name}", "exec"), scope)
    return scope


def _reference(scope, loss_of_params):
    """The same training with train.trainer (materialize path)."""
    # The step is jitted: hand it the array leaves (an Equinox model also holds
    # functions); the paths of the array leaves do not change.
    params, static = eqx.partition(scope["params_ref"], eqx.is_array)
    t = train.trainer(lambda p, b: loss_of_params(eqx.combine(p, static), b), scope["tx"],
                      adapters=scope["assignment"], factored=False, donate=False)
    state = t.init(jax.random.key(0), params, state=scope["state"])
    for _ in range(scope["steps"]):
        state, _ = t.step(state, (scope["x"], scope["y"]), params)
    return state.trainable


def _check(scope, trained, opt_state, base_before, base_after):
    init = scope["state"].trainable
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                            np.asarray(b)),
                 base_before, base_after)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(trained), strict=True)]
    assert all(changed)
    # Adam moments exist for the adapter only: mu + nu = 2 x trainable count.
    moments = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in moments) == 2 * adapters.num_trainable(init)
    assert scope["losses"][-1] < scope["losses"][0]
    want = scope["reference"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **GRAD_F32),
                 trained, want)


def test_sections_present():
    assert sorted(SECTIONS) == ["Equinox", "Flax Linen", "Flax NNX"]


def test_nnx_optimizer_with_trainable_filter():
    from flax import nnx

    s = _run("Flax NNX")
    graphdef, _ = nnx.split(s["base"], nnx.Param)
    s["params_ref"] = s["params"]
    s["reference"] = _reference(
        s, lambda p, b: ((nnx.merge(graphdef, p)(b[0]) - b[1]) ** 2).mean())
    # s["params"] was read from the base before training.
    after = nnx.to_pure_dict(nnx.state(s["model"].base, nnx.Param))
    _check(s, s["values"](s["model"].trainable), s["optimizer"].opt_state,
           s["params"], after)


def test_linen_train_state():
    s = _run("Flax Linen")
    s["params_ref"] = s["variables"]
    model = s["model"]
    s["reference"] = _reference(s, lambda p, b: ((model.apply(p, b[0]) - b[1]) ** 2
                                                 ).mean())
    _check(s, s["ts"].params, s["ts"].opt_state, s["variables"], s["variables"])
    assert int(s["ts"].step) == s["steps"]


def test_equinox_partition_filter_jit():
    s = _run("Equinox")
    s["params_ref"] = s["model"]
    s["reference"] = _reference(
        s, lambda m, b: ((jax.vmap(m)(b[0]) - b[1]) ** 2).mean())

    def weights(m):
        return [x for x in jax.tree.leaves(m) if isinstance(x, jax.Array)]

    _check(s, s["trained_state"].trainable, s["opt_state"], weights(s["model"]),
           weights(s["trained_model"]))
    assert isinstance(s["opt_state"][0], optax.ScaleByAdamState)
