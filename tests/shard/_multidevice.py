"""Sharded-training checks with 8 simulated CPU devices, run in one subprocess.

``python -m tests.shard._multidevice OUT_DIR`` (with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX starts)
trains a tiny peftjax Llama (scanned layers; unrolled for LoRA-SB) with LoRA
(factored), LoRA-SB, GaLore, FRUGAL and SpIEL sparse fine-tuning, once on one
device and once per mesh shape, for a few steps on a global batch of 8 x 128
tokens. It writes ``OUT_DIR/arrays.npz`` (final parameters per method and
mesh, keys ``<method>/<mesh>/<path>``) and ``OUT_DIR/results.json`` (the
derived shardings, the per-step signs and selections, the pmap and checkpoint
results). ``tests/shard/test_sharded.py`` compares them with its named
tolerances. Everything runs in this one process so JAX starts once.

Meshes are ``data x fsdp x tensor``. Gradients of the sign / top-k methods
(FRUGAL's sign-SGD, SpIEL's selection) are kept away from ties by a linear
term ``Σ <C, W>`` with distinct ``|C|`` added to the loss.
"""

import json
import os
import sys

N_STEPS = 4
BATCH, SEQ = 8, 128


def _setup():
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count=8" not in flags:
        raise SystemExit("set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_default_matmul_precision", "highest")
    if len(jax.devices()) != 8:
        raise SystemExit(f"expected 8 devices, got {jax.devices()}")


def _flat(tree_):
    import jax
    import numpy as np

    from peftjax import tree

    out = {}
    for p, x in tree.flatten(tree_):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out[p] = np.asarray(jax.device_get(x))
    return out


def _axes(spec):
    from peftjax.shard import _specs

    return sorted(a for e in tuple(spec) for a in _specs.axes_of(e))


def _adapter_step(assignment, loss_fn, opt, *, factored_path):
    """``(trainable, opt_state, params, frozen, batch) -> (trainable, opt_state, loss)``.

    The step ``train.trainer`` builds, spelled out so that ``jax.jit`` can pin
    each argument's sharding: the loss through ``factored.transform`` (or
    ``adapters.materialize``), the update through ``train.update_if_finite``.
    """
    import jax

    from peftjax import adapters, factored, train

    def step(trainable, opt_state, params, frozen, batch):
        def objective(t):
            if factored_path:
                return factored.transform(loss_fn, assignment, t, frozen)(params, batch)
            return loss_fn(adapters.materialize(assignment, params, t, frozen), batch)

        loss, grads = jax.value_and_grad(objective)(trainable)
        trainable, opt_state, _ = train.update_if_finite(opt, grads, opt_state, trainable,
                                                         loss)
        return trainable, opt_state, loss

    return step


def _moved(before, after):
    """The largest change of any leaf (the run must have trained)."""
    a, b = _flat(before), _flat(after)
    return max(float(abs(a[k].astype("float64") - b[k]).max()) for k in a)


def _owner_in(base):
    """``path -> the longest base path contained in it`` (or None)."""

    def owner(path):
        hits = [p for p in base if f"/{p}/" in f"/{path}/"]
        return max(hits, key=len) if hits else None

    return owner


def _big(mesh, axes):
    return sorted(a for a in axes if dict(mesh.shape)[a] > 1)


class Checks:
    """Holds the tiny models and collects results."""

    def __init__(self, out_dir):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from peftjax import models as pm
        from peftjax.models import llama

        self.out_dir = out_dir
        self.arrays = {}
        self.results = {}
        self.cfg = llama.tiny_config()
        self.gdef, self.params = pm.split_params(
            llama.LlamaForCausalLM(self.cfg, scan_layers=True, rngs=nnx.Rngs(0))
        )
        rng = np.random.default_rng(0)
        self.tokens = jnp.asarray(rng.integers(0, 256, (BATCH, SEQ)), jnp.int32)
        self.jax, self.jnp, self.np = jax, jnp, np

    # -- shared helpers --------------------------------------------------------
    def loss(self, gdef, ties=None, mesh=None):
        """Cross-entropy (+ ties); on a mesh, scan carries pinned to the batch split."""
        import optax

        from peftjax import models as pm
        from peftjax import shard, tree

        jnp = self.jnp

        def fn(p, toks):
            logits = pm.apply(gdef, p, toks[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:])
            out = ce.mean()
            if ties is not None:
                flat = tree.leaves_by_path(p)
                for path, c in ties.items():
                    out = out + jnp.sum(flat[path] * c)
            return out

        if mesh is not None:
            return shard.constrain_scan_carries(fn, mesh, batch_size=BATCH)
        return fn

    def ties(self, params, pattern, seed):
        """Distinct-magnitude linear terms: gradients far from 0 and from each other."""
        from peftjax import tree

        np, jnp = self.np, self.jnp
        rng = np.random.default_rng(seed)
        out = {}
        for path, x in tree.flatten(params):
            if tree.Rule(where=pattern, then=1).matches(path, x):
                n = x.size
                mags = 0.05 + 0.05 * rng.permutation(n) / n
                signs = rng.choice([-1.0, 1.0], n)
                out[path] = jnp.asarray((mags * signs).reshape(x.shape), jnp.float32)
        return out

    def mesh(self, shape):
        from peftjax import shard

        if shape == (1, 1, 1):
            return shard.make_mesh(devices=self.jax.devices()[:1])
        return shard.make_mesh(*shape)

    def spec_report(self, mesh, base_flat_specs, derived, owner_of):
        """``[(path, base big axes, derived big axes, spec)]`` for derived leaves."""
        from jax.sharding import NamedSharding

        from peftjax import tree

        rows = []
        for path, sh in tree.flatten(
            derived, is_leaf=lambda x: isinstance(x, NamedSharding)
        ):
            owner = owner_of(path)
            base = base_flat_specs.get(owner) if owner is not None else None
            rows.append(
                [
                    path,
                    _big(mesh, _axes(base)) if base is not None else [],
                    _big(mesh, _axes(sh.spec)),
                    repr(sh.spec),
                ]
            )
        return rows

    def save(self, method, mesh_name, tree_):
        for p, x in _flat(tree_).items():
            self.arrays[f"{method}/{mesh_name}/{p}"] = x

    def write(self):
        self.np.savez(os.path.join(self.out_dir, "arrays.npz"), **self.arrays)
        with open(os.path.join(self.out_dir, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, sort_keys=True)

    # -- adapter methods -------------------------------------------------------
    def adapter_run(self, name, make_step, params, assignment, state, opt, meshes):
        """Runs ``step_fn`` on one device and on each mesh; records everything."""
        import optax

        from peftjax import shard, tree

        jax = self.jax
        o0 = opt.init(state.trainable)
        res = {"meshes": {}}
        self.results[name] = res

        def run(step, t, o, p, f):
            with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic
                for _ in range(N_STEPS):
                    t, o, loss = step(t, o, p, f, self.tokens)
            return t, o, loss

        t, o, loss = run(
            jax.jit(make_step(None)), state.trainable, o0, params, state.frozen
        )
        self.save(name, "single", t)
        res["moved"] = _moved(state.trainable, t)
        res["loss_single"] = float(loss)
        compiled = {}
        for shape in meshes:
            mesh = self.mesh(shape)
            mname = "x".join(map(str, shape))
            p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
            s_sh = shard.adapter_shardings(mesh, assignment, params, p_sh, state)
            o_sh = shard.state_shardings(mesh, o0, state.trainable, s_sh.trainable)
            b_sh = shard.batch_sharding(mesh)
            shardings = (s_sh.trainable, o_sh, p_sh, s_sh.frozen)
            step = jax.jit(
                make_step(mesh),
                in_shardings=shardings + (b_sh,),
                out_shardings=(s_sh.trainable, o_sh, shard.replicated(mesh)),
            )
            args = jax.device_put(
                (state.trainable, o0, params, state.frozen), shardings
            )
            ts, os_, loss_s = run(step, *args)
            compiled[shape] = (step, shardings, (ts, os_))
            self.save(name, mname, ts)
            base = {p: s.spec for p, s in tree.flatten(p_sh)}
            owner = _owner_in(base)
            res["meshes"][mname] = {
                "loss": float(loss_s),
                "trainable": self.spec_report(mesh, base, s_sh.trainable, owner),
                "frozen": self.spec_report(mesh, base, s_sh.frozen, owner),
                "opt": self.spec_report(mesh, base, o_sh, owner),
                "out_specs": {p: repr(x.sharding.spec) for p, x in tree.flatten(ts)},
                "shard_shapes": {
                    p: list(x.addressable_shards[0].data.shape)
                    for p, x in tree.flatten(ts)
                },
                "shapes": {p: list(x.shape) for p, x in tree.flatten(ts)},
            }
            res["meshes"][mname]["opt_matches_trainable"] = all(
                x.sharding.spec == y.sharding.spec
                for x, y in zip(
                    jax.tree.leaves(optax.tree.get(os_, "mu")),
                    jax.tree.leaves(ts),
                    strict=True,
                )
            )
        return compiled

    def lora(self):
        import optax

        from peftjax import adapters, tree

        params = self.params
        rules = [
            tree.Rule(
                where=r"layers/(self_attn/(q|k|v|o)_proj|mlp/\w+)/kernel",
                then=adapters.lora(4, alpha=8.0),
            )
        ]
        a = tree.assign(params, rules)
        state = adapters.init(a, self.jax.random.key(1), params)
        # B != 0 so that every factor gets a gradient from the first step
        state = state._replace(
            trainable=self.jax.tree.map(lambda x: x + 0.01, state.trainable)
        )
        opt = optax.adamw(1e-2, eps=1e-4)
        self.lora_setup = (a, state, opt)
        return self.adapter_run(
            "lora",
            lambda mesh: _adapter_step(a, self.loss(self.gdef, mesh=mesh), opt,
                                       factored_path=True),
            params,
            a,
            state,
            opt,
            [(8, 1, 1), (1, 8, 1), (1, 2, 4)],
        )

    def lora_sb(self):
        import optax
        from flax import nnx

        from peftjax import inits, tree
        from peftjax import models as pm
        from peftjax.models import llama

        gdef, params = pm.split_params(
            llama.LlamaForCausalLM(self.cfg, scan_layers=False, rngs=nnx.Rngs(0))
        )
        loss_fn = self.loss(gdef)
        pattern = r"layers/\d+/(self_attn/(q|v)_proj|mlp/up_proj)/kernel"
        plan = tree.assign(
            params,
            [tree.Rule(where=pattern, then=inits.lora_sb(4, learning_rate=1e-3))],
        )
        stats = inits.accumulate_gradients(loss_fn, params, [self.tokens], list(plan))
        res = inits.run(plan, self.jax.random.key(2), params, stats=stats)
        opt = optax.adamw(1e-3, eps=1e-4)
        # unrolled layers: no scan carries to pin
        return self.adapter_run(
            "lora_sb",
            lambda mesh: _adapter_step(res.assignment, loss_fn, opt, factored_path=False),
            res.params,
            res.assignment,
            res.state,
            opt,
            [(2, 2, 2)],
        )

    # -- optimizer-side methods -----------------------------------------------
    def full_run(self, name, make_opt, meshes, *, ties=None, record=None):
        """Full-parameter steps with ``make_opt(mesh)`` (None: one device)."""
        import optax

        from peftjax import shard, tree

        jax = self.jax
        params = self.params
        res = {"meshes": {}}
        self.results[name] = res

        def make_step(opt, mesh=None):
            loss_fn = self.loss(self.gdef, ties, mesh)

            def step(p, o, toks):
                loss, g = jax.value_and_grad(loss_fn)(p, toks)
                with jax.numpy_dtype_promotion("standard"):
                    u, o = opt.update(g, o, p)
                return optax.apply_updates(p, u), o, loss

            return step

        def run(step, p, o):
            seq = []
            for _ in range(N_STEPS):
                new, o, loss = step(p, o, self.tokens)
                if record is not None:
                    seq.append(record(p, new, o))
                p = new
            return p, o, seq

        opt = make_opt(None)
        o0 = opt.init(params)
        p1, o1, seq = run(jax.jit(make_step(opt)), params, o0)
        self.save(name, "single", p1)
        res["moved"] = _moved(params, p1)
        self.save(name, "single_state", o1)
        res["record_single"] = seq
        for shape in meshes:
            mesh = self.mesh(shape)
            mname = "x".join(map(str, shape))
            opt = make_opt(mesh)
            p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
            o_sh = shard.state_shardings(mesh, o0, params, p_sh)
            b_sh = shard.batch_sharding(mesh)
            step = jax.jit(
                make_step(opt, mesh),
                in_shardings=(p_sh, o_sh, b_sh),
                out_shardings=(p_sh, o_sh, shard.replicated(mesh)),
            )
            ps, os_, seq = run(step, *jax.device_put((params, o0), (p_sh, o_sh)))
            self.save(name, mname, ps)
            self.save(name, mname + "_state", os_)
            base = {p: s.spec for p, s in tree.flatten(p_sh)}
            owner = _owner_in(base)

            res["meshes"][mname] = {
                "record": seq,
                "opt": self.spec_report(mesh, base, o_sh, owner),
                "params": {p: repr(s) for p, s in base.items()},
            }
        return res

    def galore(self):
        import optax

        from peftjax import optim, shard, tree

        labels = tree.labels(
            self.params,
            [tree.Rule(where=r"layers/(self_attn|mlp)/\w+/kernel", then="galore")],
            default="adamw",
        )
        # The default batched refresh is not run here: with simulated CPU devices
        # jaxlib's batched LAPACK SVD waits on the thread pool the 8 device
        # programs occupy, and deadlocks (see peftjax.optim.scale_by_galore).
        settings = {(1, 8, 1): "spread", (2, 1, 4): "per_layer"}

        def make_opt(mesh):
            kw = {}
            if mesh is not None:
                kind = settings[tuple(dict(mesh.shape).values())]
                if kind == "spread":
                    kw = dict(refresh_sharding=shard.refresh_sharding(mesh))
                elif kind == "per_layer":
                    kw = dict(refresh_batch_size=1)
            return optax.partition(
                {
                    "galore": optim.galore(
                        1e-2,
                        rank=4,
                        update_proj_gap=2,
                        scale=0.5,
                        inner=optim.scale_by_adam_hf(eps=1e-4),
                        **kw,
                    ),
                    "adamw": optax.adamw(1e-2, eps=1e-4),
                },
                labels,
            )

        res = self.full_run("galore", make_opt, list(settings))
        res["settings"] = {"x".join(map(str, k)): v for k, v in settings.items()}

    def frugal(self):
        import optax

        from peftjax import optim, tree

        pattern = r"layers/(self_attn|mlp)/\w+/kernel"
        labels = tree.labels(
            self.params, [tree.Rule(where=pattern, then="frugal")], default="adamw"
        )
        ties = self.ties(self.params, pattern, seed=3)
        lr = 1e-2

        def make_opt(mesh):
            del mesh
            return optax.partition(
                {
                    "frugal": optim.frugal(
                        lr,
                        density=0.25,
                        update_gap=2,
                        projector=optim.coordinates(),
                        proj_type="right",
                        inner=optim.scale_by_adam_hf(eps=1e-4),
                    ),
                    "adamw": optax.adamw(lr, eps=1e-4),
                },
                labels,
            )

        def record(p, new, o):
            """Per kernel: the sign of each entry's update and the selected columns."""
            from peftjax import tree as t

            old, cur = t.leaves_by_path(p), t.leaves_by_path(new)
            signs = {
                k: self.np.sign(self.np.asarray(cur[k] - old[k])).astype(int).tolist()
                for k in ties
            }
            idx = {}
            for path, x in t.flatten(o):
                if "projector" in path:
                    idx[path] = self.np.asarray(x).tolist()
            return {"signs": signs, "selected": idx}

        self.full_run("frugal", make_opt, [(2, 2, 2)], ties=ties, record=record)

    # -- sparse fine-tuning (SpIEL) ---------------------------------------------
    def sparse(self):
        from peftjax import adapters, masks, optim, shard, train, tree

        jax = self.jax
        params = self.params
        pattern = r"layers/(self_attn/(q|o)_proj|mlp/down_proj)/kernel"
        a = tree.assign(
            params, [tree.Rule(where=pattern, then=adapters.sparse_delta(k=64))]
        )
        state = adapters.init(a, jax.random.key(4), params)
        ties = self.ties(params, pattern, seed=5)
        # eps = 1 keeps |update| proportional to |g| (no near-equal |delta| ties)
        opt = optim.sft_adamw(1e-2, eps=1.0)
        selector = masks.spiel_selector(
            total_steps=20, reselection_steps=3, accumulation_steps=1
        )
        res = {"meshes": {}}
        self.results["sparse"] = res

        def make(mesh):
            return train.trainer(
                self.loss(self.gdef, ties, mesh), opt, adapters=a, sparse=selector,
                donate=False,
            )

        def run(step, t, f, o, s, base):
            seq = []
            for _ in range(N_STEPS + 1):  # regrowth after steps 1 and 4
                with jax.numpy_dtype_promotion("standard"):
                    t, f, o, s, loss = step(t, f, o, s, base, self.tokens)
                seq.append(
                    {
                        p: self.np.sort(self.np.asarray(f[p].indices), -1).tolist()
                        for p in f
                    }
                )
            return t, f, o, s, seq

        def step_fn(mesh):
            trainer = make(mesh)

            def step(t, f, o, s, base, toks):
                st = train.TrainState(t, f, (o, s), self.jnp.zeros([], self.jnp.int32),
                                      jax.random.key(0))
                st, m = trainer.step(st, toks, base)
                return (st.trainable, st.frozen, *st.opt_state, m["loss"])

            return step

        o0, s0 = make(None).init(jax.random.key(4), params).opt_state
        t1, f1, o1, _, seq = run(
            jax.jit(step_fn(None)), state.trainable, state.frozen, o0, s0, params
        )
        self.save("sparse", "single", {"values": t1, "indices": f1})
        res["moved"] = _moved(state.trainable, t1)
        res["indices_single"] = seq
        res["indices_initial"] = {
            p: self.np.sort(self.np.asarray(f.indices), -1).tolist()
            for p, f in state.frozen.items()
        }
        for shape in [(2, 2, 2)]:
            mesh = self.mesh(shape)
            mname = "x".join(map(str, shape))
            p_sh = shard.param_shardings(mesh, params, shard.transformer_rules())
            s_sh = shard.adapter_shardings(mesh, a, params, p_sh, state)
            o_sh = shard.state_shardings(mesh, o0, state.trainable, s_sh.trainable)
            sp_sh = shard.state_shardings(mesh, s0, state.trainable, s_sh.trainable)
            ins = (s_sh.trainable, s_sh.frozen, o_sh, sp_sh, p_sh)
            step = jax.jit(
                step_fn(mesh),
                in_shardings=ins + (shard.batch_sharding(mesh),),
                out_shardings=ins[:4] + (shard.replicated(mesh),),
            )
            args = jax.device_put((state.trainable, state.frozen, o0, s0, params), ins)
            ts, fs, _, _, seq = run(step, *args)
            self.save("sparse", mname, {"values": ts, "indices": fs})
            base = {p: s.spec for p, s in tree.flatten(p_sh)}
            owner = _owner_in(base)

            res["meshes"][mname] = {
                "indices": seq,
                "trainable": self.spec_report(mesh, base, s_sh.trainable, owner),
                "frozen": self.spec_report(mesh, base, s_sh.frozen, owner),
                "opt": self.spec_report(mesh, base, o_sh, owner),
                "spiel": self.spec_report(mesh, base, sp_sh, owner),
            }

    # -- pmap and checkpoints ------------------------------------------------------
    def pmap(self, lora_compiled):
        """The legacy pmap example against the jit (8, 1, 1) data-parallel step."""
        import importlib.util

        root = os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        )
        spec = importlib.util.spec_from_file_location(
            "pmap_legacy", os.path.join(root, "examples", "pmap_legacy.py")
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        a, state, opt = self.lora_setup
        loss_fn = self.loss(self.gdef)
        step = mod.make_pmap_step(a, loss_fn, opt)
        t, o = state.trainable, opt.init(state.trainable)
        batches = mod.split_batch(self.tokens, self.jax.local_device_count())
        with self.jax.numpy_dtype_promotion("standard"):
            for _ in range(N_STEPS):
                t, o, loss = step(t, o, self.params, state.frozen, batches)
        self.save("lora", "pmap", t)
        self.results["pmap"] = {"loss": float(loss), "devices": int(batches.shape[0])}

    def checkpoint(self, lora_compiled, tmp):
        """Save on a (2, 4) mesh; restore on (8, 1) and (1, 1); resume on (8, 1)."""
        from peftjax import shard
        from peftjax.io import checkpoint

        jax = self.jax
        a, state, opt = self.lora_setup
        step8, sh8, (t8, o8) = lora_compiled[(8, 1, 1)]
        ckpt = os.path.join(tmp, "ckpt")

        def shardings_on(mesh):
            p_sh = shard.param_shardings(mesh, self.params, shard.transformer_rules())
            s_sh = shard.adapter_shardings(mesh, a, self.params, p_sh, state)
            o_sh = shard.state_shardings(
                mesh, opt.init(state.trainable), state.trainable, s_sh.trainable
            )
            return {
                "trainable": s_sh.trainable,
                "opt_state": o_sh,
                "key": shard.replicated(mesh),
                "step": None,
            }

        mesh24 = shard.make_mesh(data=2, fsdp=4)
        saved = {
            "trainable": t8,
            "opt_state": o8,
            "key": jax.random.key(7),
            "step": N_STEPS,
        }
        saved = {
            **saved,
            **jax.device_put(
                {k: saved[k] for k in ("trainable", "opt_state")},
                {k: shardings_on(mesh24)[k] for k in ("trainable", "opt_state")},
            ),
        }
        res = {"saved_specs": {}}
        res["saved_specs"] = {
            "a": repr(
                saved["trainable"]["layers/self_attn/q_proj/kernel"].a.sharding.spec
            ),
            "mesh": dict(
                saved["trainable"][
                    "layers/self_attn/q_proj/kernel"
                ].a.sharding.mesh.shape
            ),
        }
        checkpoint.save(ckpt, N_STEPS, saved)
        want = _flat(saved)
        like = {
            "trainable": state.trainable,
            "opt_state": opt.init(state.trainable),
            "key": jax.random.key(0),
            "step": 0,
        }
        for shape in [(8, 1, 1), (1, 1, 1)]:
            mesh = self.mesh(shape)
            got = checkpoint.restore(ckpt, like, shardings=shardings_on(mesh))
            flat = _flat(got)
            q = got["trainable"]["layers/self_attn/q_proj/kernel"].a
            res["x".join(map(str, shape))] = {
                # exact: a save/restore round trip does no arithmetic
                "bit_exact": sorted(want) == sorted(flat)
                and all(
                    want[k].dtype == flat[k].dtype
                    and self.np.array_equal(want[k], flat[k])
                    for k in want
                ),
                "n_leaves": len(flat),
                "mesh": dict(q.sharding.mesh.shape),
                "spec": repr(q.sharding.spec),
                "step": got["step"],
                "key_devices": len(got["key"].sharding.device_set),
            }
            if shape == (8, 1, 1):
                rest = jax.device_put((self.params, state.frozen), sh8[2:])
                with jax.numpy_dtype_promotion("standard"):
                    t_r, _, _ = step8(
                        got["trainable"], got["opt_state"], *rest, self.tokens
                    )
                    t_c, _, _ = step8(t8, o8, *rest, self.tokens)
                fr, fc = _flat(t_r), _flat(t_c)
                # exact: the same compiled step on equal inputs, on one machine
                res["resume_bit_exact"] = sorted(fr) == sorted(fc) and all(
                    fr[k].dtype == fc[k].dtype and self.np.array_equal(fr[k], fc[k])
                    for k in fr
                )
        self.results["checkpoint"] = res


def main(out_dir):
    import faulthandler
    import tempfile
    import time

    faulthandler.dump_traceback_later(
        float(os.environ.get("MD_TIMEOUT", "600")), exit=True
    )
    _setup()
    checks = Checks(out_dir)
    times = {}
    t0 = time.time()
    compiled = checks.lora()
    times["lora"] = time.time() - t0
    for name in ("lora_sb", "galore", "frugal", "sparse"):
        t = time.time()
        getattr(checks, name)()
        times[name] = time.time() - t
        print(f"{name}: {times[name]:.1f} s", file=sys.stderr, flush=True)
    t = time.time()
    checks.pmap(compiled)
    times["pmap"] = time.time() - t
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        checks.checkpoint(compiled, tmp)
    times["checkpoint"] = time.time() - t
    checks.results["seconds"] = times
    checks.write()


if __name__ == "__main__":
    main(sys.argv[1])
