# SPDX-License-Identifier: Apache-2.0
"""DePT goldens: the authors' forward on the committed tiny Llama, in torch.

DePT (Shi & Lipani, ICLR 2024; authors' code github.com/ZhengxiangShi/DePT,
``peft/peft_model.py`` at commit 07d63b1 (its ``PROMPT_TUNING_LORA`` branch) and
``peft/tuners/prompt_tuning_lora.py`` at ce8574a) computes, for ``input_ids (B, s)``
padded to ``max_length = s``::

    inputs_embeds = word_embeddings(input_ids)
    inputs_embeds += scaling * (lora_embedding_A @ lora_embedding_B).repeat(B, 1, 1)
    inputs_embeds = cat(prompt.repeat(B, 1, 1), inputs_embeds, dim=1)
    logits = model(inputs_embeds=inputs_embeds).logits

with ``lora_embedding_A (s, r)`` (kaiming-uniform), ``lora_embedding_B (r,
d)`` (zeros) and ``scaling = lora_alpha / sqrt(r)``. This script restates
that math (it does not import or copy the authors' code) with every tensor
drawn nonzero (``B ~ N(0, 0.3²)``, so the offset is not the identity), runs
it through Hugging Face's ``LlamaForCausalLM`` on the committed tiny base
(``tests/io/golden/peft/llama_base``) and records the inputs, the input
embeddings and the logits. It also records torch's kaiming-uniform bound for
an ``(s, r)`` matrix (the authors' init of ``A``).

Output: ``tests/adapters/golden/dept/dept.npz``.

Usage: ``.venv-torch/bin/python scripts/golden/dept_make.py``
"""

import math
import os

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests")
BASE = os.path.join(ROOT, "io", "golden", "peft", "llama_base")
OUT = os.path.join(ROOT, "adapters", "golden", "dept")
IDS = [[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]]
M, R, ALPHA = 3, 2, 8.0  # prompt length, rank, the authors' default lora_alpha


def main():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    ids = torch.tensor(IDS)
    b, s = ids.shape
    d = model.config.hidden_size
    torch.manual_seed(0)
    lora_a = torch.empty(s, R)
    torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(lora_a)
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / fan_in)
    rng = np.random.default_rng(7)
    lora_b = torch.tensor(rng.standard_normal((R, d)) * 0.3, dtype=torch.float32)
    prompt = torch.tensor(rng.standard_normal((M, d)) * 0.3, dtype=torch.float32)
    scaling = ALPHA / math.sqrt(R)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        emb = emb + scaling * (lora_a @ lora_b).repeat(b, 1, 1)
        h0 = torch.cat((prompt.repeat(b, 1, 1), emb), dim=1)
        logits = model(inputs_embeds=h0, attention_mask=torch.ones(b, M + s)).logits
    os.makedirs(OUT, exist_ok=True)
    np.savez_compressed(
        os.path.join(OUT, "dept.npz"), ids=np.asarray(IDS, np.int32),
        prompt=prompt.numpy(), a=lora_a.numpy(), b=lora_b.numpy(),
        alpha=np.float32(ALPHA), h0=h0.numpy(), logits=logits.numpy(),
        kaiming_bound=np.float64(bound),
        torch_version=np.asarray(torch.__version__))
    print("wrote", OUT, "logits", tuple(logits.shape), "bound", bound)


if __name__ == "__main__":
    main()
