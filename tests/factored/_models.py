"""Third-party models for the factored-path tests: stock Flax layers only.

Nothing here imports peftjax (the point is that the factored path needs no
model cooperation). Each family has a plain, a scanned and a remat variant.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

D, H, HD, F = 8, 2, 4, 16


def _attend(q, k, v):
    s = jnp.einsum("bthd,bshd->bhts", q, k) * (HD ** -0.5)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


class LinenBlock(nn.Module):
    """Attention (DenseGeneral q/k/v/o) plus an MLP (Dense up, Einsum down)."""

    @nn.compact
    def __call__(self, x, _=None):
        qkv = [nn.DenseGeneral((H, HD), name=n)(x) for n in ("q", "k", "v")]
        a = nn.DenseGeneral(D, axis=(-2, -1), name="o")(_attend(*qkv))
        x = x + a
        h = jax.nn.gelu(nn.Dense(F, name="up")(x))
        # Torch layout (out, in) through an einsum.
        down = nn.Einsum((D, F), "btf,df->btd", name="down")(h)
        return x + down, None


class LinenModel(nn.Module):
    variant: str = "plain"  # plain | scan | remat
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        if self.variant == "scan":
            stack = nn.scan(LinenBlock, variable_axes={"params": 0},
                            split_rngs={"params": True}, length=self.layers)
            x, _ = stack(name="blocks")(x, None)
        else:
            cls = nn.remat(LinenBlock) if self.variant == "remat" else LinenBlock
            for i in range(self.layers):
                x, _ = cls(name=f"blocks_{i}")(x)
        return jnp.sum(x, axis=-1)


class NNXBlock(nnx.Module):
    """Attention (LinearGeneral q/k/v/o) plus an MLP (Linear up, Einsum down)."""

    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.k = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.v = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.o = nnx.LinearGeneral((H, HD), D, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Einsum("btf,df->btd", (D, F), rngs=rngs)

    def __call__(self, x):
        x = x + self.o(_attend(self.q(x), self.k(x), self.v(x)))
        return x + self.down(jax.nn.gelu(self.up(x)))


class NNXModel(nnx.Module):
    def __init__(self, variant: str = "plain", layers: int = 2, *, rngs: nnx.Rngs):
        self.variant = variant
        self.embed = nnx.Linear(3, D, rngs=rngs)
        if variant == "scan":
            gdef = nnx.graphdef(nnx.eval_shape(lambda: NNXBlock(nnx.Rngs(0))))
            keys = jax.random.split(rngs.params(), layers)
            state = jax.vmap(lambda k: nnx.state(NNXBlock(nnx.Rngs(params=k))))(keys)
            self.blocks = nnx.merge(gdef, state)
        else:
            self.blocks = nnx.List([NNXBlock(rngs) for _ in range(layers)])

    def __call__(self, x):
        x = self.embed(x)
        if self.variant == "scan":
            gdef, state = nnx.split(self.blocks)

            def body(h, st):
                return jax.checkpoint(lambda s, h: nnx.merge(gdef, s)(h))(st, h), None

            x, _ = jax.lax.scan(body, x, state)
        else:
            for blk in self.blocks:
                x = blk(x)
        return jnp.sum(x, axis=-1)
