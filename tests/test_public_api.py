"""Public API hygiene (docs/architecture.md#layers)."""

import enum
import importlib
import inspect
import os
import subprocess
import sys

import pytest

import peftjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Namespaces whose public functions must carry Args/Returns and an example.
DOCUMENTED = ["peftjax", "peftjax.tree", "peftjax.tree.dims", "peftjax.adapters",
              "peftjax.io.checkpoint", "peftjax.factored", "peftjax.io", "peftjax.models",
              "peftjax.models.llama", "peftjax.models.bert", "peftjax.optim", "peftjax.inits",
              "peftjax.masks", "peftjax.data", "peftjax.quant", "peftjax.shard",
              "peftjax.merge", "peftjax.merge.adapters", "peftjax.train"]


def test_import_does_not_pull_flax_or_orbax():
    code = ("import sys, peftjax, peftjax.tree, peftjax.adapters; "
            "print(sorted(m for m in ('flax', 'orbax', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("modname", DOCUMENTED)
def test_all_is_consistent_and_documented(modname):
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in dir(mod) if not n.startswith("_")
                 and inspect.isfunction(getattr(mod, n))
                 and getattr(mod, n).__module__ == modname]
    assert len(names) == len(set(names)), "duplicate names in __all__"
    problems = []
    for name in names:
        obj = getattr(mod, name)
        if inspect.ismodule(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        if not doc:
            problems.append(f"{name}: no docstring")
            continue
        if inspect.isfunction(obj) and not isinstance(obj, enum.EnumMeta):
            for section in ("Args:", "Returns:"):
                if section not in doc and inspect.signature(obj).parameters:
                    problems.append(f"{name}: no {section}")
            if "Example" not in doc and ">>>" not in doc:
                problems.append(f"{name}: no example")
    assert not problems, "\n".join(problems)


def test_version():
    assert isinstance(peftjax.__version__, str) and peftjax.__version__
