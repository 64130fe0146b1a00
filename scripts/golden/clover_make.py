# SPDX-License-Identifier: Apache-2.0
"""Golden numbers: the CLOVER authors' pair orthogonalisation and singular-value layer.

Run once in the side environment (never in CI, never imports peftjax), with
the directory of a checkout of https://github.com/fxmeng/CLOVER (commit
2749e3c433c02bfdde6d8a7f17fa19e3e281a551) as the argument::

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/clover_make.py <CLOVER checkout>

Two of the authors' files are loaded by path (never copied or committed):
``clover_for_full_rank_finetuning/utils/clover_finetuning.py``
(``orthogonalize_vo_proj`` with ``niter=0``, the exact SVD, and the
``QKVLinear`` singular-value layer) and ``clover_for_large_ratio_pruning/
model.py`` (``CausalSelfAttention.orthogonalize_qk_proj``, the Q-K pair of
a model without RoPE, called on a stand-in ``self``). They move tensors to
``"cuda"``; ``torch.Tensor.to("cuda")`` is shimmed to stay on the CPU.

Cases (torch layout, ``H`` heads of ``d``): a V-O pair with a ``v`` bias,
then its ``QKVLinear`` (bias included); a bias-free V-O pair, then its
``QKVLinear`` with a perturbed
singular-value matrix on an input batch; a Q-K pair with biases. Writes
``tests/adapters/golden/clover/clover_authors.npz``: the weights before and
after, the authors' ``S`` matrices, the inputs and outputs.
"""

import importlib.util
import pathlib
import sys
import types

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "clover" / "clover_authors.npz"
H, D, HIDDEN = 2, 3, 8  # heads, head dim, model width


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_only():
    to = torch.Tensor.to

    def shim(self, *args, **kwargs):
        if args and args[0] == "cuda":
            args = ("cpu",) + args[1:]
        return to(self, *args, **kwargs)

    torch.Tensor.to = shim


def main(repo):
    repo = pathlib.Path(repo)
    cpu_only()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ft = load(repo / "clover_for_full_rank_finetuning" / "utils" / "clover_finetuning.py",
              "_clover_ft")
    gpt = load(repo / "clover_for_large_ratio_pruning" / "model.py", "_clover_gpt")
    rng = np.random.default_rng(2411)

    def lin(n_in, n_out, bias):
        m = torch.nn.Linear(n_in, n_out, bias=bias)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(rng.standard_normal((n_out, n_in)).astype(np.float32)))
            if bias:
                m.bias.copy_(torch.from_numpy(rng.standard_normal(n_out).astype(np.float32)))
        return m

    out = {}
    # V-O pair (MHA), v with a bias
    v, o = lin(HIDDEN, H * D, True), lin(H * D, HIDDEN, False)
    out.update(vo_v=v.weight.detach().numpy().copy(), vo_vb=v.bias.detach().numpy().copy(),
               vo_o=o.weight.detach().numpy().copy())
    with torch.no_grad():
        s = ft.orthogonalize_vo_proj(v, o, H, D, niter=0)
    out.update(vo_v_new=v.weight.detach().numpy().copy(),
               vo_vb_new=v.bias.detach().numpy().copy(),
               vo_o_new=o.weight.detach().numpy(), vo_s=s.numpy().copy())
    # its singular-value layer (the bias goes through S too), S perturbed
    layer = ft.QKVLinear(v, s, H, D, dropout_rate=0.0)
    with torch.no_grad():
        layer.singular_value.weight.add_(torch.from_numpy(
            (0.3 * rng.standard_normal((H * D, D))).astype(np.float32)))
    x = rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        y = layer(torch.from_numpy(x))
    out.update(vo_t=layer.singular_value.weight.detach().numpy().reshape(H, D, D),
               vo_x=x[0], vo_y=y.numpy()[0])
    # the singular-value layer on a bias-free V-O pair (Llama), S perturbed
    v, o = lin(HIDDEN, H * D, False), lin(H * D, HIDDEN, False)
    out.update(sv_v=v.weight.detach().numpy().copy(), sv_o=o.weight.detach().numpy().copy())
    with torch.no_grad():
        s = ft.orthogonalize_vo_proj(v, o, H, D, niter=0)
    s_init = s.numpy().copy()  # QKVLinear's weight shares s's storage
    layer = ft.QKVLinear(v, s, H, D, dropout_rate=0.0)
    with torch.no_grad():
        layer.singular_value.weight.add_(torch.from_numpy(
            (0.3 * rng.standard_normal((H * D, D))).astype(np.float32)))
    x = rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        y = layer(torch.from_numpy(x))
    out.update(sv_t=layer.singular_value.weight.detach().numpy().reshape(H, D, D),
               sv_x=x[0], sv_y=y.numpy()[0], sv_v_new=v.weight.detach().numpy(),
               sv_o_new=o.weight.detach().numpy(), sv_s=s_init)
    # Q-K pair without RoPE (GPT-2 style), with biases
    q, k = lin(HIDDEN, HIDDEN, True), lin(HIDDEN, HIDDEN, True)
    out.update(qk_q=q.weight.detach().numpy().copy(), qk_qb=q.bias.detach().numpy().copy(),
               qk_k=k.weight.detach().numpy().copy(), qk_kb=k.bias.detach().numpy().copy())
    attn = types.SimpleNamespace(q_proj=q, k_proj=k, n_embd=HIDDEN, n_head=HIDDEN // 4)
    with torch.no_grad():
        gpt.CausalSelfAttention.orthogonalize_qk_proj(attn)
    out.update(qk_q_new=q.weight.detach().numpy(), qk_qb_new=q.bias.detach().numpy(),
               qk_k_new=k.weight.detach().numpy(), qk_kb_new=k.bias.detach().numpy())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
