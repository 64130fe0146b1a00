"""PEFT MiSS (``peft_type: MISS``) both ways, against torch on the tiny models.

``tests/io/golden/peft_miss/`` holds PEFT-made MiSS adapters with every
``miss_block`` perturbed away from zero (``scripts/golden/peft_miss_make.py``:
the balance variant with ``r=3`` on the Llama, so PEFT's remainder shard is
used, and ``init_weights="bat"`` on BERT), torch's outputs (active and
merged), PEFT's trainable-parameter counts, and peftjax-written adapters that
PEFT loaded (``scripts/golden/peft_miss_from_peftjax.py``: balance on the
Llama, mini on BERT; max output differences and tensor statistics in
``peft.json``). ``tests/io/golden/peft_miss_mini/`` holds PEFT's
``init_weights="mini"`` file, read here in the scanned layout.
"""

import pathlib

import jax
import pytest

from peftjax import adapters, io, tree
from tests.io import tuner_checks as tc

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "peft_miss"
GOLDEN_MINI = pathlib.Path(__file__).resolve().parent / "golden" / "peft_miss_mini"


@pytest.mark.parametrize("variant,kind,scanned", [
    ("balance", "llama", False), ("mini", "llama", True), ("bat", "bert", False)],
    ids=["balance-llama-unrolled", "mini-llama-scanned", "bat-bert"])
def test_peft_made_miss_gives_torch_outputs(variant, kind, scanned):
    golden, name = (GOLDEN_MINI, "miss_mini") if variant == "mini" else (GOLDEN, "miss")
    # bat is weight space only: its factored path materialises (with a warning).
    ad = tc.check_peft_made(golden, name, kind, scanned=scanned, fallback=variant == "bat")
    want = {"balance": "miss(rank=3, variant=balance)",
            "mini": "miss(rank=4, variant=mini, mini_r=4)",
            "bat": "miss(rank=4, variant=bat)"}[variant]
    assert {repr(x) for x in ad.assignment.values()} == {want}


def test_peftjax_written_miss_is_what_peft_verified(tmp_path):
    tc.check_peftjax_written(GOLDEN, "miss", tmp_path)


def test_miss_config_fields_not_honoured_are_refused(tmp_path):
    # bias only at PEFT's default; init_weights that disagrees with the file's
    # shard shape names the field; bat refuses miss_dropout (PEFT ignores it there).
    (tmp_path / "llama").mkdir()
    (tmp_path / "bert").mkdir()
    tc.check_refused(GOLDEN, "miss", tmp_path / "llama",
                     {"bias": "all", "init_weights": "mini"})
    tc.check_refused(GOLDEN, "miss", tmp_path / "bert", {"miss_dropout": 0.1},
                     kind="bert")
    # one PEFT config per file: save_peft refuses two different MiSS configs
    _, params, key_map, _ = tc.load("llama")
    a = tree.assign(params, [
        tree.Rule(where="layers/0/self_attn/q_proj/kernel", then=adapters.miss(2)),
        tree.Rule(where="layers/0/self_attn/v_proj/kernel", then=adapters.miss(4))])
    st = adapters.init(a, jax.random.key(0), params)
    with pytest.raises(ValueError, match="one PEFT MiSS adapter has one"):
        io.save_peft(tmp_path / "x", a, st, params, key_map=key_map)
