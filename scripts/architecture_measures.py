"""The layout measures of issue 18's closing note, read from a checkout.

Prints, and with ``--json PATH`` also writes:

* **public names per namespace**: ``len(__all__)`` of ``peftjax`` and of each
  of its subpackages (and of the public modules inside them that declare an
  ``__all__``: ``peftjax.tree.dims``, ``peftjax.io.checkpoint``, ...);
* **modules over 600 lines** in ``peftjax/`` and ``experiments/``;
* **cross-package private imports**: a module of one peftjax package reaching
  a private module or name of another (``from peftjax.tree import _paths``,
  ``import peftjax.quant._array``, ``from peftjax.io._json import read_json``,
  relative imports, ``importlib.import_module("peftjax.x._y")``, or an
  attribute chain ``adapters._base.lift`` through an imported package), listed
  one per (module, target) and counted; a package's own private modules do not
  count, nor do the tests;
* **lines of ``experiments/_recipe.py``** (or ``gone``).

Nothing is run but ``import peftjax.<package>`` for the ``__all__`` counts
(``--no-import`` skips them); the rest is parsed with :mod:`ast`.

The starting point, measured on the tree issue 18 was filed against (commit
09d00b4): 117 cross-package private imports; modules over 600 lines:
``peftjax/adapters/_base.py`` (908 lines) and ``experiments/_recipe.py``
(1017 lines); public names: peftjax 12, adapters 89, data 10, exec 3, inits 13,
io 14, io.checkpoint 9, masks 13, merge 21, merge.adapters 5, models 14,
models.bert 15, models.llama 22, optim 30, quant 16, shard 16, tree 28,
tree.dims 9 (339 in all). The targets: 0 private cross-package imports, no
module over 600 lines, ``_recipe.py`` gone or under 250 lines.

Usage::

    .venv/bin/python scripts/architecture_measures.py [--root DIR] [--json PATH]
"""

import argparse
import ast
import importlib
import json
import os
import sys

MAX_LINES = 600
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_module(root: str, parts: list[str]) -> bool:
    base = os.path.join(root, *parts)
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _py_files(root: str, top: str):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield os.path.relpath(path, root).replace(os.sep, "/"), path


def _package(rel: str) -> str:
    """``peftjax/adapters/_base.py`` -> ``adapters``; top-level modules are ``peftjax``."""
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 else "peftjax"


def _targets(source: str, rel: str) -> list[str]:
    """The absolute dotted targets ``source`` imports or reaches through attributes."""
    tree = ast.parse(source, filename=rel)
    package = rel.removesuffix(".py").split("/")[:-1]
    out, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(a.name)
                bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else (
                    a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if a.name == "*":
                    out.append(module)
                    continue
                out.append(f"{module}.{a.name}")
                bound[a.asname or a.name] = f"{module}.{a.name}"
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and "import_module" in (getattr(node.func, "attr", None),
                                      getattr(node.func, "id", None))):
            out.append(node.args[0].value)
    for node in ast.walk(tree):  # adapters._base.lift after `from peftjax import adapters`
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        attrs, base = [], node
        while isinstance(base, ast.Attribute):
            attrs.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and bound.get(base.id, "").startswith("peftjax"):
            if any(a.startswith("_") and not a.startswith("__") for a in attrs):
                out.append(".".join([bound[base.id]] + attrs[::-1]))
    return out


def _private_part(root: str, dotted: str) -> str | None:
    """``peftjax.tree._paths.flatten`` -> ``peftjax.tree._paths``; public targets -> None."""
    parts = dotted.split(".")
    i = 2
    while i < len(parts):
        name = parts[i]
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            return ".".join(parts[: i + 1])
        if not _is_module(root, parts[: i + 1]):
            return None  # a name inside a public module (a class, a function)
        i += 1
    return None


def private_imports(root: str) -> list[tuple[str, str]]:
    """``[(module file, private target)]`` across peftjax packages, each pair once."""
    found = set()
    for rel, path in _py_files(root, "peftjax"):
        mine = _package(rel)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for target in _targets(source, rel):
            parts = target.split(".")
            if parts[0] != "peftjax" or len(parts) < 3 or parts[1] == mine:
                continue
            if not _is_module(root, parts[:2]):
                continue
            private = _private_part(root, target)
            if private:
                found.add((rel, private))
    return sorted(found)


def long_modules(root: str) -> list[tuple[str, int]]:
    """``[(file, lines)]`` of modules over ``MAX_LINES`` in peftjax/ and experiments/."""
    out = []
    for top in ("peftjax", "experiments"):
        for rel, path in _py_files(root, top):
            with open(path, encoding="utf-8") as f:
                n = len(f.read().splitlines())
            if n > MAX_LINES:
                out.append((rel, n))
    return out


def public_names(root: str) -> dict[str, int]:
    """``{namespace: len(__all__)}`` for peftjax, its subpackages and their public modules."""
    sys.path.insert(0, root)
    names = ["peftjax"]
    base = os.path.join(root, "peftjax")
    for entry in sorted(os.listdir(base)):
        if entry.startswith("_") or entry.startswith("."):
            continue
        if os.path.isfile(os.path.join(base, entry, "__init__.py")):
            names.append(f"peftjax.{entry}")
            for sub in sorted(os.listdir(os.path.join(base, entry))):
                stem = sub.removesuffix(".py")
                if not stem.startswith("_") and (
                        sub.endswith(".py")
                        or os.path.isfile(os.path.join(base, entry, sub, "__init__.py"))):
                    names.append(f"peftjax.{entry}.{stem}")
        elif entry.endswith(".py"):
            names.append(f"peftjax.{entry.removesuffix('.py')}")
    out = {}
    for name in names:
        mod = importlib.import_module(name)
        if hasattr(mod, "__all__"):
            out[name] = len(mod.__all__)
    return out


def recipe_lines(root: str) -> int | str:
    path = os.path.join(root, "experiments", "_recipe.py")
    if not os.path.isfile(path):
        return "gone"
    with open(path, encoding="utf-8") as f:
        return len(f.read().splitlines())


def measure(root: str, with_imports: bool = True) -> dict:
    """All the measures of the checkout at ``root`` as one JSON-ready dict."""
    private = private_imports(root)
    return {
        "public_names": public_names(root) if with_imports else None,
        "modules_over_600_lines": [{"file": f, "lines": n} for f, n in long_modules(root)],
        "cross_package_private_imports": {
            "count": len(private),
            "list": [{"file": f, "target": t} for f, t in private],
        },
        "recipe_lines": recipe_lines(root),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=_HERE, help="the checkout to measure")
    parser.add_argument("--json", default=None, help="also write the measures here")
    parser.add_argument("--no-import", action="store_true",
                        help="skip the __all__ counts (nothing is imported)")
    args = parser.parse_args(argv)
    m = measure(os.path.abspath(args.root), with_imports=not args.no_import)
    if m["public_names"] is not None:
        print("public names (len(__all__)):")
        for name, n in m["public_names"].items():
            print(f"  {name:28s} {n:4d}")
        print(f"  {'total':28s} {sum(m['public_names'].values()):4d}")
    print(f"modules over {MAX_LINES} lines: {len(m['modules_over_600_lines'])}")
    for row in m["modules_over_600_lines"]:
        print(f"  {row['file']} {row['lines']}")
    priv = m["cross_package_private_imports"]
    print(f"cross-package private imports: {priv['count']}")
    for row in priv["list"]:
        print(f"  {row['file']} -> {row['target']}")
    print(f"experiments/_recipe.py lines: {m['recipe_lines']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(m, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
