"""The architecture as a test: which package may import which, read from the source.

Every module under ``peftjax/``, ``experiments/``, ``benchmarks/`` and
``examples/``, and every code cell of the notebooks in ``colab/``, is parsed
with :mod:`ast` (nothing is imported or run). The test fails on

* **a forbidden arrow**: a peftjax package importing one that ``ALLOWED`` does
  not list for it (the layers of ``docs/architecture.md``), or peftjax
  importing the scripts, benchmarks, examples, notebooks or tests above it;
* **a cross-package private import**: ``peftjax.<other>._x`` in any form
  (``import``, ``from ... import``, relative imports, ``importlib``, attribute
  access through an imported package) from a peftjax package, and any
  private name at all from the scripts, benchmarks, examples and notebooks,
  which use the public API only (the tests may reach private code);
* **an import cycle between packages**;
* **a module over ``MAX_LINES`` lines** in ``peftjax/`` or ``experiments/``.

There is no allowance list: any violation fails the test.
"""

import ast
import json
import os
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 600

# The layers, bottom to top. A package may import only what its row lists.
BOTTOM = {"tree", "report", "data"}
METHODS = {"adapters", "inits", "masks", "optim", "merge", "quant"}
EXECUTION = {"factored", "shard"}
LIBRARY = BOTTOM | METHODS | EXECUTION | {"io", "models"}
ALLOWED = {
    # the bottom layer: tree uses report's ParamCount; report and data stand alone
    "report": set(),
    "data": set(),
    "tree": {"report"},
    # the method layers do not import each other, except inits -> adapters
    "adapters": BOTTOM,
    "inits": BOTTOM | {"adapters"},
    "masks": BOTTOM,
    "optim": BOTTOM,
    "merge": BOTTOM,
    "quant": BOTTOM,
    # factored execution and sharding sit on the method layers, apart from each other
    "factored": BOTTOM | METHODS,
    "shard": BOTTOM | METHODS,
    "io": BOTTOM | METHODS | EXECUTION,
    "models": BOTTOM | METHODS | EXECUTION | {"io"},
    "train": LIBRARY,
    # `import peftjax` stays light: the root imports these eagerly, the rest lazily
    "peftjax": {"tree", "report", "adapters"},
}
ROOT_PACKAGE = "peftjax"  # the node name of peftjax/__init__.py
APPS = ("experiments", "benchmarks", "examples", "colab")
ABOVE_PEFTJAX = set(APPS) | {"tests", "scripts"}  # peftjax never imports these


class Import(NamedTuple):
    line: int
    target: str  # dotted name, "peftjax.adapters._base.lift" or "experiments"
    how: str  # "import", "from", "importlib" or "attribute"


class Violation(NamedTuple):
    kind: str  # "arrow", "private", "cycle" or "length"
    file: str
    line: int
    detail: str

    def __str__(self):
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.kind}: {self.detail}"


# ---------------------------------------------------------------------------
# reading the source


def _is_module(parts) -> bool:
    """Whether ``peftjax.a.b`` (as a list of parts) is a module or package on disk."""
    base = os.path.join(ROOT, *parts)
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def package_of(rel: str):
    """The peftjax package a repository file belongs to, or its top folder."""
    parts = rel.split("/")
    if parts[0] != "peftjax":
        return parts[0]
    if len(parts) == 2:  # peftjax/__init__.py or peftjax/report.py
        name = parts[1].removesuffix(".py")
        return ROOT_PACKAGE if name == "__init__" else name
    return parts[1]


def target_package(dotted: str):
    """The peftjax package a dotted import target lands in (the root for ``peftjax.x``)."""
    parts = dotted.split(".")
    if len(parts) > 1 and (parts[1] in ALLOWED or _is_module(parts[:2])):
        return parts[1]  # a package (or report.py), listed in ALLOWED or new
    return ROOT_PACKAGE


def private_part(dotted: str):
    """The leading private part of a peftjax target (``peftjax.adapters._base``), or None.

    Walks the parts after the package while they are modules; an underscore
    name reached that way (a private module, or a private name of a public
    module) is private. ``peftjax.train.TrainState._fields`` is not: the walk
    stops at a class.
    """
    parts = dotted.split(".")
    i = 2 if len(parts) > 1 and target_package(dotted) != ROOT_PACKAGE else 1
    while i < len(parts):
        name = parts[i]
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            return ".".join(parts[: i + 1])
        if not _is_module(parts[: i + 1]):
            return None
        i += 1
    return None


def imports_of(source: str, rel: str):
    """Every import of ``source`` (a file at ``rel``) with its absolute dotted target.

    Relative imports are resolved against ``rel``; ``importlib.import_module``
    with a literal name counts; an attribute chain through a name bound to a
    peftjax module (``adapters._base.lift`` after ``from peftjax import
    adapters``) counts as a reach into that module.
    """
    tree = ast.parse(source, filename=rel)
    modparts = rel.removesuffix(".py").split("/")
    package = modparts[:-1]  # the package a relative import starts from
    out, bound = [], {}  # bound: local name -> dotted module it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(node.lineno, alias.name, "import"))
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                target = module if alias.name == "*" else f"{module}.{alias.name}"
                out.append(Import(node.lineno, target, "from"))
                if alias.name != "*" and _is_module(target.split(".")):
                    bound[alias.asname or alias.name] = target
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) == "import_module")):
            out.append(Import(node.lineno, node.args[0].value, "importlib"))
    # Second pass: attribute chains through bound peftjax modules.
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        attrs, base = [], node
        while isinstance(base, ast.Attribute):
            attrs.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and bound.get(base.id, "").startswith("peftjax"):
            dotted = ".".join([bound[base.id]] + attrs[::-1])
            if any(a.startswith("_") for a in attrs):
                out.append(Import(node.lineno, dotted, "attribute"))
    return out


def _notebook_cells(path: str):
    """``(cell index, source)`` of each code cell; shell and magic lines blanked."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        lines = ["" if ln.lstrip().startswith(("!", "%")) else ln for ln in src.splitlines()]
        yield i, "\n".join(lines)


def sources():
    """``(file label, package, source)`` for every scanned module and notebook cell."""
    for top in ("peftjax", *APPS):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames
                                 if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                if name.endswith(".py"):
                    with open(path, encoding="utf-8") as f:
                        yield rel, package_of(rel), f.read()
                elif name.endswith(".ipynb") and top == "colab":
                    for i, cell in _notebook_cells(path):
                        yield f"{rel}#cell{i}", top, cell


# ---------------------------------------------------------------------------
# the checks (each takes source text, so a synthetic module can probe it)


def check_source(rel: str, source: str, package=None):
    """Arrow, private-import and length violations of one module's source."""
    package = package or package_of(rel)
    in_peftjax = rel.startswith("peftjax/")
    out = []
    for imp in imports_of(source, rel.split("#")[0]):
        top = imp.target.split(".")[0]
        if top != "peftjax":
            if in_peftjax and top in ABOVE_PEFTJAX:
                out.append(Violation("arrow", rel, imp.line, f"{package} -> {top}"))
            continue
        target = target_package(imp.target)
        if in_peftjax and target != package and target not in ALLOWED.get(package, set()):
            out.append(Violation("arrow", rel, imp.line, f"{package} -> {target}"))
        if (in_peftjax and target == package) or not (in_peftjax or package in APPS):
            continue  # a package's own private modules are its business; tests may reach in
        private = private_part(imp.target)
        if private:
            out.append(Violation("private", rel, imp.line, private))
    if rel.startswith(("peftjax/", "experiments/")) and rel.endswith(".py"):
        n = len(source.splitlines())
        if n > MAX_LINES:
            out.append(Violation("length", rel, 0, f"over {MAX_LINES} lines"))
    return out


def package_graph(items):
    """``{package: {imported package: first (file, line)}}`` between peftjax packages."""
    graph = {}
    for rel, package, source in items:
        if not rel.startswith("peftjax/"):
            continue
        node = graph.setdefault(package, {})
        for imp in imports_of(source, rel):
            if imp.target.split(".")[0] == "peftjax":
                target = target_package(imp.target)
                if target != package:
                    node.setdefault(target, (rel, imp.line))
    return graph


def find_cycles(graph):
    """Each strongly connected group of packages, as one cycle ``[a, b, ..., a]``."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # a path inside the group back to its smallest member
        start = min(group)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            back = [w for w in nxt if w == start]
            if back and len(path) > 1:
                cycles.append(path + [start])
                break
            step = [w for w in nxt if w not in seen]
            if not step:  # every member reaches start; take the direct arrow
                cycles.append(path + [start])
                break
            path.append(step[0])
            seen.add(step[0])
    return cycles


def cycle_violations(graph):
    out = []
    for cycle in find_cycles(graph):
        rel, line = graph[cycle[0]][cycle[1]]
        out.append(Violation("cycle", rel, line, " -> ".join(cycle)))
    return out


def all_violations():
    items = list(sources())
    out = [v for rel, package, source in items for v in check_source(rel, source, package)]
    return out + cycle_violations(package_graph(items))


# ---------------------------------------------------------------------------
# the tests


def test_every_package_has_a_row():
    found = {package_of(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
             for dirpath, _, files in os.walk(os.path.join(ROOT, "peftjax"))
             for f in files if f.endswith(".py")}
    assert found == set(ALLOWED), (
        "a peftjax package without a row in ALLOWED (or a row without a package): "
        f"{sorted(found ^ set(ALLOWED))}; add it to the table and to docs/architecture.md")
    assert not find_cycles({p: {q: None for q in ALLOWED[p]} for p in ALLOWED}), (
        "the table itself allows a cycle")


def test_architecture():
    new = sorted(str(v) for v in all_violations())
    assert not new, (
        "import rules of docs/architecture.md broken (the allowed arrows are ALLOWED in "
        "tests/test_architecture.py; across packages import public names only; "
        f"modules stay under {MAX_LINES} lines):\n" + "\n".join(new))


def test_scan_covers_the_repository():
    labels = [rel for rel, _, _ in sources()]
    assert any(r.startswith("peftjax/adapters/") for r in labels)
    assert any(r.startswith("experiments/") for r in labels)
    assert any(r.startswith("benchmarks/") for r in labels)
    assert any(r.startswith("examples/") for r in labels)
    assert any(r.startswith("colab/") and "#cell" in r for r in labels)


# Synthetic modules: every check must be able to fail.
@pytest.mark.parametrize("rel, source, expected", [
    # forbidden arrows
    ("peftjax/tree/_x.py", "from peftjax import adapters\n", ("arrow", "tree -> adapters")),
    ("peftjax/adapters/_x.py", "from .. import optim\n", ("arrow", "adapters -> optim")),
    ("peftjax/adapters/_x.py", "from ..optim import galore\n", ("arrow", "adapters -> optim")),
    ("peftjax/optim/_x.py", "import peftjax.models\n", ("arrow", "optim -> models")),
    ("peftjax/inits/_x.py", "from peftjax.masks import topk\n", ("arrow", "inits -> masks")),
    ("peftjax/quant/__init__.py", "from ..factored import transform\n",
     ("arrow", "quant -> factored")),
    ("peftjax/shard/_x.py", "from peftjax.factored import transform\n",
     ("arrow", "shard -> factored")),
    ("peftjax/io/_x.py", "from peftjax import models\n", ("arrow", "io -> models")),
    ("peftjax/models/_x.py", "from peftjax.train import trainer\n", ("arrow", "models -> train")),
    ("peftjax/report.py", "from peftjax.tree import paths\n", ("arrow", "report -> tree")),
    ("peftjax/tree/_x.py", "import peftjax\n", ("arrow", "tree -> peftjax")),
    ("peftjax/train/_x.py", "import experiments._recipe\n", ("arrow", "train -> experiments")),
    ("peftjax/models/_x.py", "from tests import helpers\n", ("arrow", "models -> tests")),
    ("peftjax/__init__.py", "from peftjax import models\n", ("arrow", "peftjax -> models")),
    ("peftjax/newpkg/_x.py", "from peftjax import tree\n", ("arrow", "newpkg -> tree")),
    ("peftjax/optim/_x.py", "import importlib\nimportlib.import_module('peftjax.adapters')\n",
     ("arrow", "optim -> adapters")),
    # cross-package private imports, in every form
    ("peftjax/factored/_x.py", "from peftjax.adapters._base import lift\n",
     ("private", "peftjax.adapters._base")),
    ("peftjax/factored/_x.py", "from ..adapters import _base\n",
     ("private", "peftjax.adapters._base")),
    ("peftjax/factored/_x.py", "from ..adapters._train import check\n",
     ("private", "peftjax.adapters._train")),
    ("peftjax/factored/_x.py", "import peftjax.adapters._base as b\n",
     ("private", "peftjax.adapters._base")),
    ("peftjax/factored/_x.py", "from peftjax.adapters import _check_assignment\n",
     ("private", "peftjax.adapters._check_assignment")),
    ("peftjax/factored/_x.py", "from peftjax import adapters\nadapters._base.lift(1)\n",
     ("private", "peftjax.adapters._base")),
    ("peftjax/factored/_x.py", "import peftjax\npeftjax.tree._paths.path_str(1)\n",
     ("private", "peftjax.tree._paths")),
    ("peftjax/models/_x.py", "from peftjax.io.checkpoint import _write\n",
     ("private", "peftjax.io.checkpoint._write")),
    ("peftjax/train/_x.py", "import importlib\nimportlib.import_module('peftjax.optim._galore')\n",
     ("private", "peftjax.optim._galore")),
    ("experiments/x.py", "from peftjax.tree import _paths\n", ("private", "peftjax.tree._paths")),
    ("benchmarks/x.py", "from peftjax.models import _functional\n",
     ("private", "peftjax.models._functional")),
    ("examples/x.py", "import peftjax as pj\npj.adapters._lora.lora_init(1)\n",
     ("private", "peftjax.adapters._lora")),
    ("colab/x.ipynb#cell2", "from peftjax.adapters._base import lift\n",
     ("private", "peftjax.adapters._base")),
    # over the line budget
    ("peftjax/adapters/_x.py", "x = 1\n" * (MAX_LINES + 1), ("length", f"over {MAX_LINES} lines")),
    ("experiments/_x.py", "x = 1\n" * (MAX_LINES + 1), ("length", f"over {MAX_LINES} lines")),
])
def test_checker_flags_a_synthetic_module(rel, source, expected):
    found = {(v.kind, v.detail) for v in check_source(rel, source)}
    assert expected in found, (rel, source, found)


@pytest.mark.parametrize("rel, source", [
    ("peftjax/inits/_x.py", "from peftjax import adapters\nfrom ..tree import Rule\n"),
    ("peftjax/factored/_x.py", "from ..quant import QArray\nfrom ..adapters import lora\n"),
    ("peftjax/adapters/_lora.py", "from . import _base\nfrom ._base import lift\n_base.x(1)\n"),
    ("peftjax/models/llama/_x.py", "from .._hub import load\nfrom ...io import checkpoint\n"),
    ("peftjax/train/_x.py", "from peftjax import models, optim\n"
                            "from peftjax.train import TrainState\nTrainState._fields\n"),
    ("experiments/x.py", "import _recipe\nfrom peftjax import adapters\nadapters.lora(r=2)\n"),
    ("tests/x.py", "from peftjax.adapters._base import lift\n"),  # tests may reach private code
    ("peftjax/adapters/_x.py", "x = 1\n" * MAX_LINES),
    # the line budget covers peftjax/ and experiments/ only
    ("benchmarks/x.py", "x = 1\n" * (MAX_LINES + 1)),
])
def test_checker_passes_a_clean_module(rel, source):
    assert check_source(rel, source) == [], check_source(rel, source)


def test_relative_import_resolution():
    targets = [i.target for i in imports_of(
        "from ..adapters._base import lift\nfrom . import _sym\nfrom ... import tree\n",
        "peftjax/models/llama/_x.py")]
    assert targets == ["peftjax.models.adapters._base.lift", "peftjax.models.llama._sym",
                       "peftjax.tree"], targets
    targets = [i.target for i in imports_of("from .. import adapters\n",
                                            "peftjax/factored/__init__.py")]
    assert targets == ["peftjax.adapters"], targets


def test_cycles_are_found():
    graph = {"a": {"b": ("peftjax/a/_x.py", 3)}, "b": {"c": ("peftjax/b/_x.py", 1)},
             "c": {"a": ("peftjax/c/_x.py", 7)}, "d": {"a": ("peftjax/d/_x.py", 1)}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    (v,) = cycle_violations(graph)
    assert (v.kind, v.file, v.line, v.detail) == ("cycle", "peftjax/a/_x.py", 3, "a -> b -> c -> a")
    assert find_cycles({"a": {"b": None}, "b": {}}) == []
    # a cycle written in source is found end to end
    items = [("peftjax/tree/_x.py", "tree", "from peftjax import adapters\n"),
             ("peftjax/adapters/_x.py", "adapters", "from ..tree import Rule\n")]
    assert [v.detail for v in cycle_violations(package_graph(items))] == [
        "adapters -> tree -> adapters"]


