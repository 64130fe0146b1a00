"""BERT family: tiny random encoders against a float64 reference, padding,
RoBERTa positions, the classification head, loading, and MiniLM goldens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import io, tree
from peftjax import models as pm
from peftjax.models import bert
from tests.helpers import EXACT, GRAD_F32, MATMUL_F32, f64
from tests.models import _reference
from tests.models.conftest import passage

# The MiniLM parity bars: max|diff| <= 1e-4 * max|ref| per sequence on
# the last hidden states, cosine >= 0.99999 on the mean-pooled embeddings.
GOLDEN_REL = 1e-4
MIN_COSINE = 0.99999


def make_config(**kw):
    base = dict(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=20,
        layer_norm_eps=1e-12,
    )
    base.update(kw)
    return bert.BertConfig(**base)


def make(cfg, *, num_labels=None, seed=0):
    if num_labels is None:
        abstract = nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0)))
    else:
        abstract = nnx.eval_shape(
            lambda: bert.BertForSequenceClassification(
                cfg, num_labels=num_labels, rngs=nnx.Rngs(0)
            )
        )
    g, shapes = pm.split_params(abstract)
    rng = np.random.default_rng(seed)

    def init(path, x):
        n = rng.standard_normal(x.shape)
        n = (
            1 + 0.1 * n
            if path.endswith("scale")
            else (0.1 * n if path.endswith("bias") else n / np.sqrt(x.shape[-2]))
        )
        return jnp.asarray(n, x.dtype)

    return g, tree.map_with_path(init, shapes)


def close(got, want):
    """MATMUL_F32 with atol scaled by max|want| (f32 summation-order noise)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(
        f64(got),
        want,
        rtol=MATMUL_F32["rtol"],
        atol=MATMUL_F32["rtol"] * np.abs(want).max(),
    )


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_matches_float64_reference_with_padding(model_type):
    cfg = make_config(model_type=model_type, pad_token_id=1)
    g, p = make(cfg)
    ids = jnp.asarray([[2, 5, 7, 9, 11, 1, 1], [3, 4, 5, 6, 7, 8, 9]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0, 0], [1] * 7], jnp.int32)
    fwd = jax.jit(lambda p, i, m: pm.apply(g, p, i, attention_mask=m))
    got = fwd(p, ids, mask)
    ref = _reference.bert_hidden(p, cfg, ids, mask)
    close(got[0, :5], ref[0, :5])
    close(got[1], ref[1])
    # Padding invariance: the first row alone, unpadded.
    alone = fwd(p, ids[:1, :5], mask[:1, :5])
    close(alone[0], f64(got[0, :5]))


def test_classification_head_and_gradients():
    cfg = make_config()
    g, p = make(cfg, num_labels=3)
    assert "classifier" in p and p["classifier"]["kernel"].shape == (16, 3)
    ids = jnp.asarray([[2, 5, 7, 9], [3, 4, 0, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)
    logits = jax.jit(lambda p: pm.apply(g, p, ids, attention_mask=mask))(p)
    h = _reference.bert_hidden(p, cfg, ids, mask)
    m = np.asarray(mask, np.float64)[..., None]
    pooled = (h * m).sum(1) / m.sum(1)
    want = pooled @ f64(p["classifier"]["kernel"]) + f64(p["classifier"]["bias"])
    close(logits, want)

    def loss(params):
        lg = pm.apply(g, params, ids, attention_mask=mask)
        return -jax.nn.log_softmax(lg)[jnp.arange(2), jnp.asarray([0, 2])].mean()

    grads = jax.jit(jax.grad(loss))(p)
    assert tree.paths(grads) == tree.paths(p)
    # The classifier gradient is pooled^T @ dlogits (float64 chain rule).
    lg = f64(logits)
    sm = np.exp(lg - lg.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    d = sm.copy()
    d[[0, 1], [0, 2]] -= 1.0
    np.testing.assert_allclose(
        f64(grads["classifier"]["kernel"]), pooled.T @ d / 2, **GRAD_F32
    )


def test_load_hf_directory_with_prefix_and_head(tmp_path):
    cfg = make_config()
    g, p = make(cfg, num_labels=2)
    flat = tree.leaves_by_path(p)
    tensors = {"bert.embeddings.position_ids": np.arange(20)[None]}
    names = {
        "embeddings/word_embeddings/embedding": "embeddings.word_embeddings.weight",
        "embeddings/position_embeddings/embedding": "embeddings.position_embeddings."
        "weight",
        "embeddings/token_type_embeddings/embedding": (
            "embeddings.token_type_embeddings.weight"
        ),
        "embeddings/layer_norm/scale": "embeddings.LayerNorm.weight",
        "embeddings/layer_norm/bias": "embeddings.LayerNorm.bias",
    }
    sub = {
        "attention/query": "attention.self.query",
        "attention/key": "attention.self.key",
        "attention/value": "attention.self.value",
        "attention/output": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "output_norm": "output.LayerNorm",
    }
    for path, value in flat.items():
        v = np.asarray(value)
        if path.startswith("classifier"):
            name = "classifier." + ("weight" if path.endswith("kernel") else "bias")
        elif path in names:
            name = "bert." + names[path]
        else:
            _, i, *mid, leaf = path.split("/")
            hf_leaf = "bias" if leaf == "bias" else "weight"
            name = f"bert.encoder.layer.{i}.{sub['/'.join(mid)]}.{hf_leaf}"
        tensors[name] = v.T if path.endswith("kernel") else v
    tensors["bert.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    io.write_safetensors(tmp_path / "model.safetensors", tensors)
    model = bert.load_bert(tmp_path, num_labels=2)
    _, loaded = pm.split_params(model)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **EXACT), loaded, p
    )
    encoder = bert.load_bert(tmp_path)
    assert "classifier" not in pm.split_params(encoder)[1]
    tensors["bert.encoder.layer.1.output.dense.weight"] = np.zeros((16, 23), np.float32)
    io.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(
        ValueError, match=r"layers/1/output/kernel.*\(23, 16\).*\(24, 16\)"
    ):
        bert.load_bert(tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        bert.BertConfig.from_hf(
            {"model_type": "bert", "position_embedding_type": "relative_key"}
        )
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        bert.BertConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="must divide"):
        make_config(num_attention_heads=5)


@pytest.mark.slow
def test_minilm_golden(golden):
    model = bert.load_bert(pm.minilm_dir())
    tok = pm.load_tokenizer(pm.minilm_dir())
    inp = golden.inputs["minilm"]
    tok.no_padding()
    tok.no_truncation()
    # The committed ids are still this tokenizer's: [CLS]=101 ... [SEP]=102.
    a = tok.encode(passage(golden, "ppl")).ids
    assert inp["ids"][0] == a[:63] + [102] and a[0] == 101
    b = tok.encode(passage(golden, "logits_a")).ids
    assert inp["ids"][1][:40] == b[:39] + [102]
    ids, mask = jnp.asarray(inp["ids"], jnp.int32), jnp.asarray(inp["mask"], jnp.int32)
    hidden = jax.jit(lambda i, m: model(i, attention_mask=m))(ids, mask)
    ref = golden.minilm["last_hidden_state"]
    for i in range(2):
        m = np.asarray(inp["mask"][i], bool)
        diff = np.abs(f64(hidden[i])[m] - ref[i][m]).max()
        assert diff <= GOLDEN_REL * np.abs(ref[i][m]).max(), (i, diff)
    emb = f64(bert.mean_pool(hidden, mask))
    want = golden.minilm["mean_pooled"]
    cos = (
        (emb * want).sum(-1)
        / np.linalg.norm(emb, axis=-1)
        / np.linalg.norm(want, axis=-1)
    )
    assert (cos >= MIN_COSINE).all(), cos


def test_prefix_matches_reference_and_zero_length_is_base():
    from peftjax import adapters

    cfg = make_config()
    g, p = make(cfg)
    ids = jnp.asarray([[2, 5, 7, 9, 11, 1], [3, 4, 5, 6, 7, 8]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6], jnp.int32)
    hd = cfg.hidden_size // cfg.num_attention_heads
    prefix = adapters.prefix_tuning(jax.random.key(0), 3, num_layers=2,
                                    num_kv_heads=cfg.num_attention_heads, head_dim=hd,
                                    init_std=0.5)
    got = pm.apply(g, p, ids, attention_mask=mask, prefix=prefix)
    ref = _reference.bert_hidden(p, cfg, ids, mask,
                                 prefix=(prefix.keys, prefix.values))
    close(got[0, :4], ref[0, :4])
    close(got[1], ref[1])
    empty = adapters.PrefixParams(keys=prefix.keys[:, :0], values=prefix.values[:, :0])
    np.testing.assert_array_equal(
        np.asarray(pm.apply(g, p, ids, attention_mask=mask, prefix=empty)),
        np.asarray(pm.apply(g, p, ids, attention_mask=mask)))
    with pytest.raises(ValueError, match=r"expected \(L, P, H, D\)"):
        pm.apply(g, p, ids, prefix=adapters.PrefixParams(keys=prefix.keys[:1],
                                                          values=prefix.values[:1]))
