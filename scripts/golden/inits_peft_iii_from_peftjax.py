"""peftjax side of the MiCA file round trip: train MiCA as PEFT did, save it for PEFT.

    .venv/bin/python scripts/golden/inits_peft_iii_from_peftjax.py

Reads tests/inits/golden/inits_peft_iii.npz (the MLP weights and inputs),
runs ``inits.mica`` and the same three SGD steps, and writes
tests/inits/golden/mica_from_peftjax/ with ``io.save_peft``
(init_lora_weights="mica"); then re-run ``inits_peft_iii.py`` so PEFT loads
it and records its logits and trainable count.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import factored, inits, io, tree
from peftjax.io import PeftKey, TensorLayout

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "inits", "golden")
LAYERS = ("l1", "l2")


def mlp(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def main():
    g = np.load(os.path.join(GOLDEN, "inits_peft_iii.npz"))
    params = {n: {"kernel": jnp.asarray(g[f"W_{n}"].T)} for n in LAYERS}
    plan = tree.assign(params, [tree.Rule(where=r"l\d/kernel", then=inits.mica(4, alpha=8.0))])
    res = inits.run(plan, jax.random.key(0), params)
    x = jnp.asarray(g["mica_x"])

    def loss(t):
        y = factored.transform(mlp, res.assignment, t, res.state.frozen)(res.params, x)
        return jnp.mean(y ** 2)

    t = res.state.trainable
    for _ in range(3):
        t = jax.tree.map(lambda p, d: p - 0.5 * d, t, jax.grad(loss)(t))
    km = {f"{n}/kernel": PeftKey(n, "weight", TensorLayout.KERNEL) for n in LAYERS}
    d = io.save_peft(os.path.join(GOLDEN, "mica_from_peftjax"), res.assignment,
                     res.state._replace(trainable=t), params, key_map=km)
    print("wrote", os.path.normpath(d))


if __name__ == "__main__":
    main()
