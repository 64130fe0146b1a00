"""The LoRA-adapted two-layer net of scripts/golden/optim_peft_lorafa_riemannian.py, in JAX."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

GOLDEN = pathlib.Path(__file__).parent / "golden" / "peft_lorafa_riemannian.npz"


def load():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def init_trainable(g):
    """PEFT layout -> peftjax: ``a = lora_Aᵀ``, ``b = lora_Bᵀ``."""
    t = lambda k: jnp.asarray(g[f"init/{k}"].T)  # noqa: E731
    return {"fc1/kernel": {"a": t("fc1_a"), "b": t("fc1_b")},
            "fc2/kernel": {"a": t("fc2_a"), "b": t("fc2_b")},
            "fc2/bias": jnp.asarray(g["init/fc2_bias"])}


def loss_fn(g, s):
    w1, b1 = jnp.asarray(g["init/fc1_w"].T), jnp.asarray(g["init/fc1_bias"])[None, :]
    w2 = jnp.asarray(g["init/fc2_w"].T)
    x, y = jnp.asarray(g["x"]), jnp.asarray(g["y"])

    def loss(tr):
        l1, l2 = tr["fc1/kernel"], tr["fc2/kernel"]
        h = jnp.tanh(x @ w1 + b1 + s * (x @ l1["a"]) @ l1["b"])
        out = h @ w2 + tr["fc2/bias"][None, :] + s * (h @ l2["a"]) @ l2["b"]
        return jnp.mean((out - y) ** 2)

    return loss


def trajectory(tx, g, s, steps):
    """Parameters after each step, in PEFT layout, and the loss before each."""
    tr = init_trainable(g)
    loss = loss_fn(g, s)

    @jax.jit
    def step(tr, st):
        val, grads = jax.value_and_grad(loss)(tr)
        u, st = tx.update(grads, st, tr)
        return optax.apply_updates(tr, u), st, val

    st = tx.init(tr)
    out = {k: [] for k in ("fc1_a", "fc1_b", "fc2_a", "fc2_b", "fc2_bias")}
    losses = []
    for _ in range(steps):
        tr, st, val = step(tr, st)
        losses.append(float(val))
        for layer in ("fc1", "fc2"):
            out[f"{layer}_a"].append(np.asarray(tr[f"{layer}/kernel"]["a"]).T)
            out[f"{layer}_b"].append(np.asarray(tr[f"{layer}/kernel"]["b"]).T)
        out["fc2_bias"].append(np.asarray(tr["fc2/bias"]))
    return {k: np.stack(v) for k, v in out.items()}, np.asarray(losses), st


def assert_matches(g, case, traj, losses, rtol, atol):
    for k, v in traj.items():
        np.testing.assert_allclose(v, g[f"traj/{case}/{k}"], rtol=rtol, atol=atol,
                                   err_msg=f"{case}/{k}")
    np.testing.assert_allclose(losses, g[f"loss/{case}"], rtol=rtol, atol=atol)
