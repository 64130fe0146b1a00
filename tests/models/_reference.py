"""Float64 numpy references of the models, written from the papers' formulas."""

import numpy as np

from tests.helpers import f64


def rms_norm(x, scale, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def rope(x, positions, inv_freq):
    """x: (T, heads, D); rotate-half convention."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (T, D/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama_logits(params, cfg, tokens, mask=None):
    """Logits (B, T, V) of the unrolled pure param dict, one row at a time."""
    p = params
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    mask = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros((b, t, cfg.vocab_size))
    emb = f64(p["embed_tokens"]["embedding"])
    for r in range(b):
        keep = np.nonzero(mask[r])[0]  # padding removed entirely
        x = emb[tokens[r, keep]]
        n = len(keep)
        pos = np.arange(n)
        for i in range(cfg.num_hidden_layers):
            lp = p["layers"][i]
            a = lp["self_attn"]

            def lin(name, z, a=a):
                y = z @ f64(a[name]["kernel"])
                return y + f64(a[name]["bias"]) if "bias" in a[name] else y

            z = rms_norm(x, f64(lp["input_layernorm"]["scale"]), cfg.rms_norm_eps)
            q = rope(lin("q_proj", z).reshape(n, h, hd), pos, inv_freq)
            k = rope(lin("k_proj", z).reshape(n, kv, hd), pos, inv_freq)
            v = lin("v_proj", z).reshape(n, kv, hd)
            o = np.zeros((n, h, hd))
            for head in range(h):
                g = head // (h // kv)  # query head -> its key/value head
                s = q[:, head] @ k[:, g].T / np.sqrt(hd)
                s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                o[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
            x = x + o.reshape(n, h * hd) @ f64(a["o_proj"]["kernel"])
            m = lp["mlp"]
            z = rms_norm(
                x, f64(lp["post_attention_layernorm"]["scale"]), cfg.rms_norm_eps
            )
            gate = z @ f64(m["gate_proj"]["kernel"])
            up = z @ f64(m["up_proj"]["kernel"])
            x = x + (gate / (1 + np.exp(-gate)) * up) @ f64(m["down_proj"]["kernel"])
        x = rms_norm(x, f64(p["norm"]["scale"]), cfg.rms_norm_eps)
        head = emb.T if cfg.tie_word_embeddings else f64(p["lm_head"]["kernel"])
        out[r, keep] = x @ head
    return out


def _layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def bert_hidden(params, cfg, tokens, mask=None, prefix=None):
    """Last hidden states (B, T, d) of the pure BERT param dict (exact GELU).

    ``prefix``: optional ``(keys, values)`` of shape ``(L, P, H, D)`` prepended
    to every layer's keys and values (always attended to); the tokens'
    positions then start at ``P`` (Hugging Face's cache-length offset).
    """
    from scipy.special import erf

    tokens = np.asarray(tokens)
    b, t = tokens.shape
    mask = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)
    e = params["embeddings"]
    off = 0 if prefix is None else np.shape(prefix[0])[1]
    if cfg.model_type == "roberta":
        pos = (np.cumsum(mask, 1) + off) * mask + cfg.pad_token_id
    else:
        pos = np.broadcast_to(off + np.arange(t), (b, t))
    x = (
        f64(e["word_embeddings"]["embedding"])[tokens]
        + f64(e["position_embeddings"]["embedding"])[pos]
        + f64(e["token_type_embeddings"]["embedding"])[np.zeros_like(tokens)]
    )
    x = _layer_norm(
        x,
        f64(e["layer_norm"]["scale"]),
        f64(e["layer_norm"]["bias"]),
        cfg.layer_norm_eps,
    )
    h = cfg.num_attention_heads
    hd = cfg.hidden_size // h

    def lin(p, z):
        return z @ f64(p["kernel"]) + f64(p["bias"])

    for i in range(cfg.num_hidden_layers):
        lp = params["layers"][i]
        a = lp["attention"]
        q, k, v = (lin(a[n], x).reshape(b, t, h, hd) for n in ("query", "key", "value"))
        kmask = mask
        if prefix is not None:
            pk, pv = (np.broadcast_to(f64(z[i])[None], (b,) + z[i].shape) for z in prefix)
            k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
            kmask = np.concatenate([np.ones((b, pk.shape[1]), bool), mask], 1)
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        s = np.where(kmask[:, None, None, :], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", w, v).reshape(b, t, h * hd)
        x = _layer_norm(
            x + lin(a["output"], o),
            f64(lp["attention_norm"]["scale"]),
            f64(lp["attention_norm"]["bias"]),
            cfg.layer_norm_eps,
        )
        u = lin(lp["intermediate"], x)
        u = 0.5 * u * (1 + erf(u / np.sqrt(2)))
        x = _layer_norm(
            x + lin(lp["output"], u),
            f64(lp["output_norm"]["scale"]),
            f64(lp["output_norm"]["bias"]),
            cfg.layer_norm_eps,
        )
    return x
