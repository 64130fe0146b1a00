"""Every ```python block of the README runs, in order, as a reader would run it.

Blocks share one scope in README order (a later block may continue an
earlier one, as the three compositions continue the quickstart). A block can
be left out only with an explicit marker on the line before its fence,
``<!-- readme-test: skip reason=... -->``, and every such skip must be listed
in ``SKIPPED`` below with the place that covers it. Shell and text blocks are
not run.
"""

import os
import re

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# First line of each skipped block -> why, and what runs the same calls instead.
SKIPPED = {
    "from peftjax import shard": (
        "needs 8 devices and a transformer's parameter names; "
        "tests/shard/test_sharded.py runs these calls on a tiny Llama over 8 "
        "simulated CPU devices"
    ),
}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+reason=(.+?)\s*-->\s*$")


def readme_blocks(text):
    """``(language, code, skip_reason or None, line)`` for every fenced block."""
    out = []
    for m in _FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        out.append((m.group(1), m.group(2), skip.group(1) if skip else None,
                    text.count("\n", 0, m.start()) + 1))
    return out


def run_blocks(text):
    """Runs the python blocks in one scope; returns the scope."""
    scope: dict = {}
    for lang, code, skip, line in readme_blocks(text):
        if lang != "python" or skip:
            continue
        name = f"README.md:{line}"
        with jax.numpy_dtype_promotion("standard"):  # a user's default setting
            exec(compile(code, name, "exec"), scope)
    return scope


def _read():
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_every_python_block_runs():
    scope = run_blocks(_read())
    # Quickstart: merged weights exported in the base's shape.
    assert scope["merged"]["dense1"]["kernel"].shape == (16, 32)
    # Quickstart: train.fit ran the step to steps=20 and the loss went down.
    losses = [row["loss"] for row in scope["result"].history]
    assert scope["result"].step == 20 and losses[-1] < losses[0]
    # Composition 3 (hybrid): one step on {"adapters", "full"}.
    hybrid = scope["hybrid_state"]
    assert set(hybrid.trainable) == {"adapters", "full"}
    assert list(hybrid.trainable["full"]) == ["dense2/kernel"] and int(hybrid.step) == 1
    # Optimizer-only and sparse: one step each, finite and not skipped.
    for name in ("full_state", "sparse_state"):
        assert int(scope[name].step) == 1, name
    assert np.isfinite(float(scope["metrics"]["loss"])) and float(scope["metrics"]["loss"]) >= 0.0
    assert int(scope["metrics"]["skipped"]) == 0
    # Several adapters: one output row per example, the base for id -1.
    assert scope["out"].shape == (3, 4)
    # Quantised base: the assignment targets the quantised kernel's view.
    assert list(scope["a"]) == ["dense1/kernel"]


def test_skips_are_explicit_and_listed():
    blocks = readme_blocks(_read())
    langs = {lang for lang, *_ in blocks}
    # A python block hidden under another fence name would not be run.
    assert langs <= {"python", "bash", "text"}, langs
    skipped = {code.splitlines()[0]: reason for lang, code, reason, _ in blocks if reason}
    assert set(skipped) == set(SKIPPED), (skipped, SKIPPED)
    assert all(len(r) > 20 for r in skipped.values()), skipped
    assert sum(lang == "python" and not r for lang, _, r, _ in blocks) >= 6


def test_a_broken_block_fails():
    # The runner reports the README line of a block that does not run.
    text = "intro\n\n```python\nx = 1\n```\n\n```python\ny = undefined_name\n```\n"
    try:
        run_blocks(text)
    except NameError as e:
        assert "undefined_name" in str(e)
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        assert tb.tb_frame.f_code.co_filename == "README.md:7"
    else:
        raise AssertionError("a block with an undefined name ran")
    skipped = "```python\nx = 1\n```\n<!-- readme-test: skip reason=needs 8 devices -->\n" \
              "```python\nraise RuntimeError\n```\n"
    assert run_blocks(skipped)["x"] == 1
