"""Golden files for peftjax.inits (parity III): PEFT's orthogonal, MiCA, EVA and LoftQ.

Run once in the torch side environment (never imports peftjax):

    .venv-torch/bin/python scripts/golden/inits_peft_iii.py

Writes tests/inits/golden/inits_peft_iii.npz, torch layout (W (out, in),
lora_A (r, in), lora_B (out, r)); the test converts (Flax kernel = W.T,
a = lora_A.T, b = lora_B.T).

* orthogonal, MiCA: PEFT's own init (``get_peft_model``) on a two-layer MLP
  x (10) -> l1 -> tanh -> l2 (8), r=4, lora_alpha=8; MiCA also records
  PEFT's trainable count and the logits and lora_A after 3 SGD steps (MiCA's
  file format both ways: ``peft_mica_make.py``, on the tiny models).
* EVA: PEFT's ``initialize_lora_eva_weights`` on a three-layer MLP with
  r=2, rho=2, tau=0.99 over a list of batches; the layer inputs of each
  batch are recorded (the explicit statistics peftjax takes).
* LoftQ: PEFT's ``loftq_init`` needs bitsandbytes on a GPU; this file holds a
  float64 NumPy transcription of its loop with a NumPy NF4 quantiser written
  after bitsandbytes' blockwise NF4 (64 consecutive values of the flattened
  torch weight per block, absmax scale, nearest code).
"""

import copy
import os

import numpy as np
import peft
import torch
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights
from torch import nn

torch.set_num_threads(2)
GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "inits", "golden")
OUT = os.path.join(GOLDEN, "inits_peft_iii.npz")
LLAMA_BASE = os.path.join(GOLDEN, "..", "..", "io", "golden", "peft", "llama_base")
R, ALPHA = 4, 8
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def spectrum_matrix(rng, m, n, decay):
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    s = 3.0 * decay ** np.arange(k)
    return (u[:, :k] * s) @ v[:, :k].T


class MLP(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.names = [f"l{i + 1}" for i in range(len(dims) - 1)]
        for name, (i, o) in zip(self.names, zip(dims[:-1], dims[1:], strict=True), strict=True):
            setattr(self, name, nn.Linear(i, o, bias=False))

    def forward(self, x):
        for k, name in enumerate(self.names):
            x = getattr(self, name)(x)
            if k + 1 < len(self.names):
                x = torch.tanh(x)
        return x


def set_weights(model, rng, out, prefix, decays=None):
    with torch.no_grad():
        for k, name in enumerate(model.names):
            layer = getattr(model, name)
            m, n = layer.weight.shape
            w = spectrum_matrix(rng, m, n, decays[k] if decays else 0.7).astype(np.float32)
            layer.weight.copy_(torch.from_numpy(w))
            out[f"{prefix}W_{name}"] = w


def nf4_qdq(w):
    """bitsandbytes' blockwise NF4 round trip (float64): 64-value blocks of flat(w)."""
    flat = w.reshape(-1, 64)
    absmax = np.abs(flat).max(1, keepdims=True)
    norm = flat / absmax
    codes = np.argmin(np.abs(norm[..., None] - NF4), axis=-1)
    return (NF4[codes] * absmax).reshape(w.shape)


def loftq64(w, rank, num_iter):
    """PEFT 0.21.2 loftq_init's loop in float64 (quantiser: nf4_qdq)."""
    res = w.copy()
    errs = []
    for i in range(num_iter):
        q = nf4_qdq(res)
        res = w - q
        u, s, vh = np.linalg.svd(res, full_matrices=False)
        big_l = u[:, :rank] * np.sqrt(s[:rank])
        big_r = np.sqrt(s[:rank])[:, None] * vh[:rank]
        errs.append(np.linalg.norm(w - q - big_l @ big_r))
        if i + 1 == num_iter:
            break
        res = w - big_l @ big_r
    return q, big_r, big_l, np.array(errs)


def main():
    rng = np.random.default_rng(0)
    out = {}
    base = MLP([10, 12, 8])
    set_weights(base, rng, out, "")
    targets = list(base.names)

    def make(cfg):
        torch.manual_seed(0)
        return peft.get_peft_model(copy.deepcopy(base), cfg)

    pm = make(peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                              init_lora_weights="orthogonal"))
    for name in targets:
        layer = getattr(pm.base_model.model, name)
        out[f"orth_A_{name}"] = layer.lora_A["default"].weight.detach().numpy().copy()
        out[f"orth_B_{name}"] = layer.lora_B["default"].weight.detach().numpy().copy()

    pm = make(peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                              init_lora_weights="mica"))
    out["mica_trainable"] = np.array(sum(p.numel() for p in pm.parameters() if p.requires_grad))
    for name in targets:
        layer = getattr(pm.base_model.model, name)
        out[f"mica_A_{name}"] = layer.lora_A["default"].weight.detach().numpy().copy()
        out[f"mica_B_{name}"] = layer.lora_B["default"].weight.detach().numpy().copy()
    x = rng.standard_normal((6, 10)).astype(np.float32)
    out["mica_x"] = x
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    xt = torch.from_numpy(x)
    for _ in range(3):
        opt.zero_grad()
        loss = (pm(xt) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out["mica_logits"] = pm(xt).numpy().copy()
    for name in targets:
        layer = getattr(pm.base_model.model, name)
        out[f"mica_A3_{name}"] = layer.lora_A["default"].weight.detach().numpy().copy()
        assert not layer.lora_B["default"].weight.requires_grad
    # EVA: three layers, inputs with a decaying spectrum, a list of batches.
    eva_base = MLP([10, 12, 12, 8])
    set_weights(eva_base, rng, out, "eva_", (0.3, 0.7, 0.7))
    mix = spectrum_matrix(rng, 10, 10, 0.9).astype(np.float32)
    batches = [(rng.standard_normal((48, 10)) @ mix).astype(np.float32) for _ in range(6)]
    for b, xb in enumerate(batches):  # the explicit statistics: each layer's inputs
        h = torch.from_numpy(xb)
        with torch.no_grad():
            for k, name in enumerate(eva_base.names):
                out[f"eva_in_{name}_{b}"] = h.numpy().copy()
                h = getattr(eva_base, name)(h)
                if k + 1 < len(eva_base.names):
                    h = torch.tanh(h)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(eva_base.names),
                          init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(eva_base), cfg)
    loader = [torch.from_numpy(b) for b in batches]
    initialize_lora_eva_weights(pm, loader, forward_fn=lambda m, inp: m(inp),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                show_progress_bar=False)
    pc = pm.peft_config["default"]
    ranks, alphas = [], []
    for name in eva_base.names:
        layer = getattr(pm.base_model.model, name)
        if not hasattr(layer, "lora_A"):
            ranks.append(0)
            alphas.append(0.0)
            continue
        a = layer.lora_A["default"].weight.detach().numpy().copy()
        out[f"eva_A_{name}"] = a
        out[f"eva_B_{name}"] = layer.lora_B["default"].weight.detach().numpy().copy()
        ranks.append(a.shape[0])
        alphas.append(pc.alpha_pattern.get(name, pc.lora_alpha))
    out["eva_ranks"] = np.array(ranks)
    out["eva_alphas"] = np.array(alphas, np.float64)
    out["eva_rank_pattern"] = np.array(sorted(f"{k}={v}" for k, v in pc.rank_pattern.items()))

    # EVA on the committed tiny Llama (tests/io/golden/peft/llama_base): q_proj,
    # o_proj and down_proj (distinct inputs), batches of 2 sequences of 8 ids.
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(LLAMA_BASE, dtype=torch.float32).eval()
    ids = rng.integers(0, 64, size=(8, 2, 8))
    out["llama_eva_ids"] = ids
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"],
                          init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama, cfg)
    mask = torch.ones(2, 8, dtype=torch.long)
    loader = [{"input_ids": torch.from_numpy(b), "attention_mask": mask} for b in ids]
    initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
    pc = pm.peft_config["default"]
    names = []
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            names.append(name)
            out[f"llama_eva_A_{name}"] = module.lora_A["default"].weight.detach().numpy().copy()
    out["llama_eva_modules"] = np.array(names)
    out["llama_eva_rank_pattern"] = np.array(sorted(f"{k}={v}" for k, v in pc.rank_pattern.items()))
    out["llama_eva_alpha_pattern"] = np.array(
        sorted(f"{k}={v}" for k, v in pc.alpha_pattern.items()))

    # LoftQ (float64 transcription): W (16 out, 128 in), r = 4.
    w = (0.05 * rng.standard_normal((16, 128)) + spectrum_matrix(rng, 16, 128, 0.5) / 3)
    out["loftq_W"] = w.astype(np.float32)
    w64 = out["loftq_W"].astype(np.float64)
    for it in (1, 3):
        q, a, b, errs = loftq64(w64, R, it)
        out[f"loftq{it}_Q"] = q.astype(np.float32)  # float32 files: 1e-8 relative rounding
        out[f"loftq{it}_A"], out[f"loftq{it}_B"] = a.astype(np.float32), b.astype(np.float32)
        out[f"loftq{it}_errs"] = errs
    out["loftq_qonly_err"] = np.array(np.linalg.norm(w64 - nf4_qdq(w64)))
    out["meta_versions"] = np.array([f"peft {peft.__version__}", f"torch {torch.__version__}"])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print("wrote", os.path.normpath(OUT), len(out), "arrays;", "eva ranks", ranks, alphas,
          "loftq errs", out["loftq3_errs"], "q-only", out["loftq_qonly_err"],
          "llama eva", out["llama_eva_rank_pattern"], out["llama_eva_alpha_pattern"])


if __name__ == "__main__":
    main()
