"""The README's quickstart runs as written."""

import os
import re

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quickstart_runs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # a user's default setting
        exec(compile(code, "README.md:quickstart", "exec"), scope)
    assert float(scope["loss"]) >= 0.0
    assert scope["merged"]["dense1"]["kernel"].shape == (16, 32)
