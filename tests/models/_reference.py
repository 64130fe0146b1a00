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
    p = {k: v for k, v in params.items()}
    d, h, kv, hd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                    cfg.dim_head)
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
            z = rms_norm(x, f64(lp["post_attention_layernorm"]["scale"]), cfg.rms_norm_eps)
            gate = z @ f64(m["gate_proj"]["kernel"])
            up = z @ f64(m["up_proj"]["kernel"])
            x = x + (gate / (1 + np.exp(-gate)) * up) @ f64(m["down_proj"]["kernel"])
        x = rms_norm(x, f64(p["norm"]["scale"]), cfg.rms_norm_eps)
        head = emb.T if cfg.tie_word_embeddings else f64(p["lm_head"]["kernel"])
        out[r, keep] = x @ head
    return out
