"""Hugging Face PEFT adapter format: exact round trips and loud errors.

Format-level tests on a dict-of-arrays model with a hand-written key map;
the model families' key maps and the torch goldens are in
``tests/models/test_peft_models.py``. Conversion: torch ``lora_A (r, in)`` =
``a.T``, ``lora_B (out, r)`` = ``b.T``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io, tree
from peftjax.io import PeftKey, TensorLayout
from tests.helpers import EXACT, MATMUL_F32, f64

L, D, F, V = 2, 6, 10, 12
K, E, B = TensorLayout.KERNEL, TensorLayout.EMBEDDING, TensorLayout.VECTOR


def key_map():
    km = {
        "embed/embedding": PeftKey("embed", "weight", E),
        "head/kernel": PeftKey("head", "weight", K),
        "head/bias": PeftKey("head", "bias", B),
    }
    for i in range(L):
        for name, kind in (("q", K), ("v", K), ("up", K)):
            km[f"layers/{i}/{name}/kernel"] = PeftKey(
                f"blocks.{i}.{name}", "weight", kind
            )
        km[f"layers/{i}/v/bias"] = PeftKey(f"blocks.{i}.v", "bias", B)
    return km


def make_params(scanned):
    rng = np.random.default_rng(0)

    def n(*s):
        return jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)

    layers = {
        i: {
            "q": {"kernel": n(D, D)},
            "v": {"kernel": n(D, D), "bias": n(D)},
            "up": {"kernel": n(D, F)},
        }
        for i in range(L)
    }
    p = {
        "embed": {"embedding": n(V, D)},
        "head": {"kernel": n(D, 3), "bias": n(3)},
        "layers": layers,
    }
    return tree.stack_layers(p) if scanned else p


def perturb(state, seed=1):
    """Non-zero values everywhere (B = 0 at init would hide transposes)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(state.trainable)
    new = [
        jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape), x.dtype)
        for x in leaves
    ]
    return adapters.AdapterState(jax.tree.unflatten(treedef, new), state.frozen)


def roundtrip(tmp_path, params, rules, **kw):
    a = tree.assign(params, rules)
    st = perturb(adapters.init(a, jax.random.key(0), params))
    d = io.save_peft(tmp_path / "ad", a, st, params, key_map=key_map(), **kw)
    back = io.load_peft(d, params, key_map=key_map())
    assert sorted(back.assignment) == sorted(a)
    for p in a:
        jax.tree.map(
            lambda x, y: np.testing.assert_array_equal(x, y),
            st.trainable[p],
            back.state.trainable[p],
        )
    want = adapters.materialize(a, params, *st)
    got = adapters.materialize(back.assignment, params, *back.state)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **EXACT), want, got)
    cfg = json.loads((d / "adapter_config.json").read_text())
    return cfg, back, d


@pytest.mark.parametrize("scanned", [False, True])
def test_lora_roundtrip_patterns(tmp_path, scanned):
    params = make_params(scanned)
    pre = "layers/" if scanned else r"layers/\d+/"
    rules = [
        tree.Rule(where=pre + "q/kernel", then=adapters.lora(4, alpha=16.0)),
        tree.Rule(where=pre + "v/kernel", then=adapters.lora(2, alpha=16.0)),
        tree.Rule(where=pre + "up/kernel", then=adapters.lora(4, alpha=5.0)),
    ]
    cfg, _, d = roundtrip(tmp_path, params, rules, base_model_name_or_path="tiny")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert cfg["rank_pattern"] == {"blocks.0.v": 2, "blocks.1.v": 2}
    assert cfg["alpha_pattern"] == {"blocks.0.up": 5, "blocks.1.up": 5}
    assert cfg["target_modules"] == ["q", "up", "v"]
    assert cfg["base_model_name_or_path"] == "tiny"
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    assert t["base_model.model.blocks.1.up.lora_A.weight"].shape == (4, D)
    assert t["base_model.model.blocks.1.up.lora_B.weight"].shape == (F, 4)


def test_stacked_and_unrolled_write_identical_tensors(tmp_path):
    un, sc = make_params(False), make_params(True)
    a_un = tree.assign(
        un, [tree.Rule(where=r"layers/\d+/up/kernel", then=adapters.lora(2))]
    )
    st_un = perturb(adapters.init(a_un, jax.random.key(0), un))
    a_sc = tree.assign(sc, [tree.Rule(where="layers/up/kernel", then=adapters.lora(2))])
    st_sc = adapters.AdapterState(
        tree.stack_layers(st_un.trainable), tree.stack_layers(st_un.frozen)
    )
    d1 = io.save_peft(tmp_path / "u", a_un, st_un, un, key_map=key_map())
    d2 = io.save_peft(tmp_path / "s", a_sc, st_sc, sc, key_map=key_map())
    t1, _ = io.read_safetensors(d1 / "adapter_model.safetensors")
    t2, _ = io.read_safetensors(d2 / "adapter_model.safetensors")
    assert sorted(t1) == sorted(t2)
    for k in t1:  # exact: unstacking is a pure copy, no arithmetic
        np.testing.assert_array_equal(t1[k], t2[k], strict=True, err_msg=k)
    assert (d1 / "adapter_config.json").read_text() == (
        d2 / "adapter_config.json"
    ).read_text()


@pytest.mark.parametrize("scanned", [False, True])
def test_rslora_dora_roundtrip(tmp_path, scanned):
    params = make_params(scanned)
    pre = "layers/" if scanned else r"layers/\d+/"
    rs = adapters.Scaling.ALPHA_OVER_SQRT_RANK
    cfg, _, _ = roundtrip(
        tmp_path,
        params,
        [
            tree.Rule(
                where=pre + "(q|v)/kernel",
                then=adapters.lora(4, alpha=16.0, scaling=rs),
            )
        ],
        use_rslora=True,
    )
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 16
    cfg, _, d = roundtrip(
        tmp_path / "dora",
        params,
        [tree.Rule(where=pre + "(q|up)/kernel", then=adapters.dora(2, alpha=8.0))],
    )
    assert cfg["use_dora"] is True and cfg["lora_alpha"] == 8
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    assert t["base_model.model.blocks.0.up.lora_magnitude_vector"].shape == (F,)


def test_embedding_lora_and_modules_to_save(tmp_path):
    params = make_params(False)
    a = tree.assign(
        params,
        [
            tree.Rule(
                where="embed/embedding",
                then=adapters.lora(3, alpha=6.0, init=adapters.LoRAInit.EMBEDDING),
            )
        ],
    )
    st = perturb(adapters.init(a, jax.random.key(0), params))
    full = {"head/kernel": params["head"]["kernel"] + 1.0}
    d = io.save_peft(tmp_path, a, st, params, key_map=key_map(), full=full)
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    assert t["base_model.model.embed.lora_embedding_A"].shape == (3, V)
    assert t["base_model.model.embed.lora_embedding_B"].shape == (D, 3)
    # the whole module is saved: the trained kernel (transposed) and the base bias
    np.testing.assert_array_equal(
        t["base_model.model.head.weight"], np.asarray(full["head/kernel"]).T
    )
    np.testing.assert_array_equal(
        t["base_model.model.head.bias"], params["head"]["bias"]
    )
    back = io.load_peft(d, params, key_map=key_map())
    assert json.loads((d / "adapter_config.json").read_text())["modules_to_save"] == [
        "head"
    ]
    np.testing.assert_array_equal(back.full["head/kernel"], full["head/kernel"])
    np.testing.assert_array_equal(back.full["head/bias"], params["head"]["bias"])
    np.testing.assert_array_equal(
        back.state.trainable["embed/embedding"].b, st.trainable["embed/embedding"].b
    )


@pytest.mark.parametrize("scanned", [False, True])
def test_ia3_and_vera_roundtrip(tmp_path, scanned):
    params = make_params(scanned)
    pre = "layers/" if scanned else r"layers/\d+/"
    cfg, _, d = roundtrip(
        tmp_path,
        params,
        [
            tree.Rule(where=pre + "v/kernel", then=adapters.ia3(adapters.Side.OUTPUT)),
            tree.Rule(where=pre + "up/kernel", then=adapters.ia3(adapters.Side.INPUT)),
        ],
    )
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["up"]
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    assert t["base_model.model.blocks.0.up.ia3_l"].shape == (1, D)
    assert t["base_model.model.blocks.0.v.ia3_l"].shape == (D, 1)
    cfg, _, d = roundtrip(
        tmp_path / "vera",
        params,
        [
            tree.Rule(
                where=pre + "(q|up)/kernel", then=adapters.vera(3, max_in=D, max_out=F)
            )
        ],
    )
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is True
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    assert t["base_model.vera_A"].shape == (3, D) and t["base_model.vera_B"].shape == (
        F,
        3,
    )
    if scanned:
        return
    # torch's generator cannot be reproduced: the projections must be in the file
    edit_tensors(d, lambda t: {k: v for k, v in t.items() if k != "base_model.vera_A"})
    with pytest.raises(ValueError, match="lacks base_model.vera_A"):
        io.load_peft(d, params, key_map=key_map())
    edit_config(d, save_projection=False)
    with pytest.raises(ValueError, match="save_projection=False"):
        io.load_peft(d, params, key_map=key_map())


def test_unsupported_method_and_mixed(tmp_path):
    params = make_params(False)
    a = tree.assign(params, [tree.Rule(where="head/kernel", then=adapters.ssf())])
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(TypeError, match="head/kernel.*no Hugging Face PEFT format"):
        io.save_peft(tmp_path, a, st, params, key_map=key_map())
    a = tree.assign(
        params,
        [
            tree.Rule(where="layers/0/q/kernel", then=adapters.lora(2)),
            tree.Rule(where="layers/1/q/kernel", then=adapters.dora(2)),
        ],
    )
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="one method"):
        io.save_peft(tmp_path, a, st, params, key_map=key_map())
    a = tree.assign(
        params, [tree.Rule(where="layers/0/q/kernel", then=adapters.lora(2))]
    )
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="'layers/0/q/kernel' is not in the key map"):
        io.save_peft(tmp_path, a, st, params, key_map={})


@pytest.fixture
def written(tmp_path):
    params = make_params(False)
    a = tree.assign(
        params, [tree.Rule(where=r"layers/\d+/q/kernel", then=adapters.lora(2))]
    )
    st = perturb(adapters.init(a, jax.random.key(0), params))
    return params, io.save_peft(tmp_path / "ad", a, st, params, key_map=key_map())


def edit_config(d, **kw):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kw)
    p.write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    p = d / "adapter_model.safetensors"
    t, _ = io.read_safetensors(p)
    io.write_safetensors(p, fn(dict(t)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("lora_bias", True),
        ("layers_to_transform", [0]),
        ("target_parameters", ["x"]),
        ("fan_in_fan_out", True),
        ("bias", "all"),
        ("init_lora_weights", "pissa"),
        ("some_future_field", 3),
    ],
)
def test_config_fields_refused(written, field, value):
    params, d = written
    edit_config(d, **{field: value})
    with pytest.raises(ValueError, match=field):
        io.load_peft(d, params, key_map=key_map())


@pytest.mark.parametrize(
    "field, value",
    [
        ("corda_config", {"method": "ipm"}),
        ("lora_ga_config", {"direction": "ArB2r"}),
        ("init_lora_weights", "orthogonal"),
    ],
)
def test_init_only_fields_of_plain_adapters_accepted(written, field, value):
    """PEFT's converted adapters keep e.g. corda_config with init_lora_weights=True."""
    params, d = written
    edit_config(d, **{field: value})
    assert sorted(io.load_peft(d, params, key_map=key_map()).assignment) == [
        "layers/0/q/kernel",
        "layers/1/q/kernel",
    ]
    edit_config(d, init_lora_weights="corda")  # unconverted: sits on a modified base
    with pytest.raises(ValueError, match="init_lora_weights='corda'"):
        io.load_peft(d, params, key_map=key_map())


def test_unsupported_peft_type(written):
    params, d = written
    edit_config(d, peft_type="POLY")
    with pytest.raises(ValueError, match="peft_type='POLY' is not supported"):
        io.load_peft(d, params, key_map=key_map())


def test_unknown_missing_and_misshaped_tensors(written):
    params, d = written
    edit_tensors(
        d,
        lambda t: {
            **t,
            "base_model.model.blocks.0.zz.lora_A.weight": np.zeros((2, 3), np.float32),
        },
    )
    with pytest.raises(ValueError, match="blocks.0.zz.lora_A.weight"):
        io.load_peft(d, params, key_map=key_map())
    edit_tensors(
        d,
        lambda t: {
            k: v
            for k, v in t.items()
            if "zz" not in k and k != "base_model.model.blocks.1.q.lora_B.weight"
        },
    )
    with pytest.raises(ValueError, match=r"'blocks.1.q'.*needs \['a', 'b'\]"):
        io.load_peft(d, params, key_map=key_map())
    edit_tensors(
        d,
        lambda t: {
            **t,
            "base_model.model.blocks.1.q.lora_B.weight": np.zeros(
                (D + 1, 2), np.float32
            ),
        },
    )
    with pytest.raises(ValueError, match=r"layers/1/q/kernel.*\(7,\)|shapes"):
        io.load_peft(d, params, key_map=key_map())
    edit_tensors(
        d,
        lambda t: {
            **t,
            "base_model.model.blocks.1.q.lora_B.weight": np.zeros((D, 2), np.float32),
        },
    )
    edit_config(d, rank_pattern={"blocks.1.q": 3})
    with pytest.raises(ValueError, match="rank 2 in the file but 3"):
        io.load_peft(d, params, key_map=key_map())


def test_pickle_never_loaded(written):
    params, d = written
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(ValueError, match="never loads"):
        io.load_peft(d, params, key_map=key_map())


def test_scanned_needs_every_layer(written):
    params, d = written
    edit_tensors(d, lambda t: {k: v for k, v in t.items() if "blocks.1" not in k})
    # target_modules=["q"] selects blocks.1.q too: missing in either layout
    for p in (params, tree.stack_layers(params)):
        with pytest.raises(
            ValueError, match=r"target_modules=\['q'\].*\['blocks.1.q'\]"
        ):
            io.load_peft(d, p, key_map=key_map())
    edit_config(d, target_modules=r"blocks\.0\.q")  # a regex selecting layer 0 only
    with pytest.raises(ValueError, match=r"layers \[0\].*not for layers \[1\]"):
        io.load_peft(d, tree.stack_layers(params), key_map=key_map())
    back = io.load_peft(d, params, key_map=key_map())  # unrolled: fine
    assert sorted(back.assignment) == ["layers/0/q/kernel"]


def test_base_layer_copy_checked_not_dropped(tmp_path):
    """PEFT's save_embedding_layers copies the base table: equal passes, else error."""
    params = make_params(False)
    a = tree.assign(
        params,
        [
            tree.Rule(
                where="embed/embedding",
                then=adapters.lora(2, init=adapters.LoRAInit.EMBEDDING),
            )
        ],
    )
    st = perturb(adapters.init(a, jax.random.key(0), params))
    d = io.save_peft(tmp_path, a, st, params, key_map=key_map())
    table = np.asarray(params["embed"]["embedding"])
    edit_tensors(d, lambda t: {**t, "base_model.model.embed.base_layer.weight": table})
    assert sorted(io.load_peft(d, params, key_map=key_map()).assignment) == [
        "embed/embedding"
    ]
    edit_tensors(
        d, lambda t: {**t, "base_model.model.embed.base_layer.weight": table + 1.0}
    )
    with pytest.raises(ValueError, match="base-layer copy"):
        io.load_peft(d, params, key_map=key_map())


H, HD = 2, 3  # head-split kernels: q (D, H, HD), o (H, HD, D)


def split_key_map():
    dq = tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    do = tree.DimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    km = {}
    for i in range(L):
        km[f"layers/{i}/q/kernel"] = PeftKey(f"blocks.{i}.q", "weight", K, dq)
        km[f"layers/{i}/o/kernel"] = PeftKey(f"blocks.{i}.o", "weight", K, do)
    return km


@pytest.mark.parametrize("scanned", [False, True])
def test_head_split_kernels_use_the_torch_matrix_view(tmp_path, scanned):
    """An (embed, heads, head_dim) kernel is torch's (heads·head_dim, embed) weight."""
    rng = np.random.default_rng(3)
    un = {
        "layers": {
            i: {
                "q": {
                    "kernel": jnp.asarray(rng.standard_normal((D, H, HD)), jnp.float32)
                },
                "o": {
                    "kernel": jnp.asarray(rng.standard_normal((H, HD, D)), jnp.float32)
                },
            }
            for i in range(L)
        }
    }
    params = tree.stack_layers(un) if scanned else un
    b = (0,) if scanned else ()
    n = len(b)
    dq = tree.DimensionNumbers(
        reduction_axis=n, output_axis=(n + 1, n + 2), batch_axis=b
    )
    do = tree.DimensionNumbers(
        reduction_axis=(n, n + 1), output_axis=n + 2, batch_axis=b
    )
    pre = "layers/" if scanned else r"layers/\d+/"
    a = tree.assign(
        params,
        [
            tree.Rule(
                where=pre + "q/kernel",
                then=adapters.lora(2, alpha=4.0, dimension_numbers=dq),
            ),
            tree.Rule(
                where=pre + "o/kernel",
                then=adapters.lora(2, alpha=4.0, dimension_numbers=do),
            ),
        ],
    )
    st = perturb(adapters.init(a, jax.random.key(0), params))
    full_path = "layers/q/kernel" if scanned else "layers/0/q/kernel"
    d = io.save_peft(tmp_path / "ad", a, st, params, key_map=split_key_map())
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    # torch delta s·B@A (out, in), reshaped by hand to the Flax kernel's axes
    merged = tree.leaves_by_path(adapters.materialize(a, params, *st))
    for i in range(L):
        for name, perm in (("q", (1, 0)), ("o", (1, 0))):
            A = f64(t[f"base_model.model.blocks.{i}.{name}.lora_A.weight"])
            B = f64(t[f"base_model.model.blocks.{i}.{name}.lora_B.weight"])
            delta = (2.0 * B @ A).transpose(perm)  # (in, out) of the matrix view
            base = f64(un["layers"][i][name]["kernel"])
            want = base + delta.reshape(base.shape)  # C order: heads·head_dim
            got = (
                merged[f"layers/{name}/kernel"][i]
                if scanned
                else merged[f"layers/{i}/{name}/kernel"]
            )
            np.testing.assert_allclose(f64(got), want, **MATMUL_F32)
    back = io.load_peft(d, params, key_map=split_key_map())
    for p in a:
        jax.tree.map(
            np.testing.assert_array_equal, st.trainable[p], back.state.trainable[p]
        )
    jax.tree.map(
        np.testing.assert_array_equal,
        adapters.materialize(a, params, *st),
        adapters.materialize(back.assignment, params, *back.state),
    )
    # a head-split leaf trained in full: torch (out, in) of its matrix view
    a_o = {k: v for k, v in a.items() if "o/" in k}
    st_o = adapters.AdapterState(
        {k: st.trainable[k] for k in a_o}, {k: st.frozen[k] for k in a_o}
    )
    full = {full_path: tree.leaves_by_path(params)[full_path] + 1.0}
    d = io.save_peft(
        tmp_path / "full", a_o, st_o, params, key_map=split_key_map(), full=full
    )
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    q0 = np.asarray(un["layers"][0]["q"]["kernel"] + 1.0)  # the float32 leaf + 1
    np.testing.assert_array_equal(
        t["base_model.model.blocks.0.q.weight"], q0.reshape(D, H * HD).T
    )
    back = io.load_peft(d, params, key_map=split_key_map())
    np.testing.assert_array_equal(back.full[full_path], full[full_path])
    # the key map must carry the adapter's view, else the file would not read back
    with pytest.raises(ValueError, match=r"dimension_numbers=None.*reads back"):
        io.save_peft(
            tmp_path / "bad",
            a,
            st,
            params,
            key_map={
                k: v._replace(dimension_numbers=None)
                for k, v in split_key_map().items()
            },
        )


@pytest.mark.parametrize("scanned", [False, True])
def test_layer_modules_to_save_roundtrip(tmp_path, scanned):
    """A stacked leaf trained in full becomes one module per layer, and back."""
    params = make_params(scanned)
    pre = "layers/" if scanned else r"layers/\d+/"
    a = tree.assign(params, [tree.Rule(where=pre + "q/kernel", then=adapters.lora(2))])
    st = perturb(adapters.init(a, jax.random.key(0), params))
    flat = tree.leaves_by_path(params)
    vk = "layers/v/kernel" if scanned else "layers/1/v/kernel"
    full = {vk: flat[vk] * 2.0}
    d = io.save_peft(tmp_path, a, st, params, key_map=key_map(), full=full)
    cfg = json.loads((d / "adapter_config.json").read_text())
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    v1 = f64(make_params(False)["layers"][1]["v"]["kernel"])
    np.testing.assert_array_equal(
        f64(t["base_model.model.blocks.1.v.weight"]), 2 * v1.T
    )
    np.testing.assert_array_equal(
        t["base_model.model.blocks.1.v.bias"],
        make_params(False)["layers"][1]["v"]["bias"],
    )
    want = ["blocks.0.v", "blocks.1.v"] if scanned else ["blocks.1.v"]
    assert cfg["modules_to_save"] == want
    back = io.load_peft(d, params, key_map=key_map())
    np.testing.assert_array_equal(back.full[vk], full[vk])
    vb = "layers/v/bias" if scanned else "layers/1/v/bias"
    np.testing.assert_array_equal(back.full[vb], flat[vb])  # the module's other tensor
    # modules_to_save names a module of the key map whose tensors are gone
    edit_tensors(d, lambda t: {k: v for k, v in t.items() if ".v." not in k})
    with pytest.raises(
        ValueError, match=r"modules_to_save \[.*'blocks.1.v'\].*none of"
    ):
        io.load_peft(d, params, key_map=key_map())


def tied_key_map():
    return {k: v for k, v in key_map().items() if v.module != "head"}


def test_tied_head_gets_peft_weight_tying(tmp_path):
    """LoRA on a table the head shares: head copies + ensure_weight_tying (PEFT's)."""
    params = make_params(False)
    tie = ("embed/embedding", "head")
    a = tree.assign(
        params,
        [
            tree.Rule(
                where="embed/embedding",
                then=adapters.lora(3, alpha=6.0, init=adapters.LoRAInit.EMBEDDING),
            ),
            tree.Rule(where=r"layers/\d+/q/kernel", then=adapters.lora(2, alpha=4.0)),
        ],
    )
    st = perturb(adapters.init(a, jax.random.key(0), params))
    d = io.save_peft(
        tmp_path / "ad", a, st, params, key_map=tied_key_map(), tied_head=tie
    )
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] is True and cfg["target_modules"] == [
        "embed",
        "q",
    ]
    assert cfg["rank_pattern"] == {"blocks.0.q": 2, "blocks.1.q": 2}  # head: r=3
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    e = st.trainable["embed/embedding"]
    np.testing.assert_array_equal(
        t["base_model.model.head.lora_A.weight"], e.b
    )  # (r, d)
    np.testing.assert_array_equal(
        t["base_model.model.head.lora_B.weight"], e.a
    )  # (V, r)
    back = io.load_peft(d, params, key_map=tied_key_map(), tied_head=tie)
    jax.tree.map(
        np.testing.assert_array_equal,
        st.trainable["embed/embedding"],
        back.state.trainable["embed/embedding"],
    )
    with pytest.raises(ValueError, match=r"head.lora_A.weight.*pass tied_head"):
        io.load_peft(d, params, key_map=tied_key_map())
    edit_tensors(
        d,
        lambda t: {
            **t,
            "base_model.model.head.lora_A.weight": t[
                "base_model.model.head.lora_A.weight"
            ]
            + 1.0,
        },
    )
    with pytest.raises(ValueError, match="not the tied copy"):
        io.load_peft(d, params, key_map=tied_key_map(), tied_head=tie)
    edit_tensors(d, lambda t: {k: v for k, v in t.items() if ".head." not in k})
    assert (
        "embed/embedding"
        in io.load_peft(d, params, key_map=tied_key_map(), tied_head=tie).assignment
    )
    edit_config(d, ensure_weight_tying=False)  # PEFT would leave the head unadapted
    with pytest.raises(ValueError, match="without ensure_weight_tying"):
        io.load_peft(d, params, key_map=tied_key_map(), tied_head=tie)
    # a full table on a tied model: the head gets the same weight
    q = {k: v for k, v in a.items() if "q/" in k}
    full = {"embed/embedding": params["embed"]["embedding"] + 1.0}
    d = io.save_peft(
        tmp_path / "full",
        q,
        adapters.AdapterState({k: st.trainable[k] for k in q}, {k: None for k in q}),
        params,
        key_map=tied_key_map(),
        full=full,
        tied_head=tie,
    )
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        t["base_model.model.head.weight"], full["embed/embedding"]
    )
    assert json.loads((d / "adapter_config.json").read_text())["ensure_weight_tying"]
    back = io.load_peft(d, params, key_map=tied_key_map(), tied_head=tie)
    np.testing.assert_array_equal(back.full["embed/embedding"], full["embed/embedding"])
    with pytest.raises(ValueError, match="untied head"):
        io.save_peft(tmp_path / "x", a, st, params, key_map=key_map(), tied_head=tie)
