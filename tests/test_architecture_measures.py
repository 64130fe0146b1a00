"""scripts/architecture_measures.py on a synthetic checkout with known imports and sizes."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    path = os.path.join(ROOT, "scripts", "architecture_measures.py")
    spec = importlib.util.spec_from_file_location("architecture_measures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_measures_count_each_private_reach_once_and_long_modules(tmp_path):
    root = str(tmp_path)
    _write(root, "peftjax/__init__.py", "")
    _write(root, "peftjax/a/__init__.py", "from peftjax.a._x import f as f\n")
    _write(root, "peftjax/a/_x.py", "def f():\n    return 1\n")
    _write(root, "peftjax/a/pub.py", "_hidden = 1\nshown = 2\n")
    _write(root, "peftjax/b/__init__.py", "")
    _write(root, "peftjax/b/_y.py", "\n".join([
        "import peftjax.a._x",                        # peftjax.a._x
        "from peftjax.a import _x",                   # the same target: counted once
        "from peftjax.a._x import f",                 # the same again
        "from peftjax.a.pub import _hidden",          # a private name of a public module
        "from peftjax.a.pub import shown",            # public: not counted
        "from peftjax.b import _z",                   # b's own private module: not counted
        "from ..a import f as g",                     # relative, public: not counted
        "import importlib",
        "m = importlib.import_module('peftjax.a._x')",  # counted once with the above
    ]) + "\n")
    _write(root, "peftjax/b/_z.py", "from peftjax import a\n\nv = a._x.f()\n")
    _write(root, "peftjax/b/_long.py", "x = 1\n" * 601)
    _write(root, "experiments/_recipe.py", "x = 1\n" * 700)
    m = _script().measure(root, with_imports=False)
    assert m["cross_package_private_imports"] == {"count": 3, "list": [
        {"file": "peftjax/b/_y.py", "target": "peftjax.a._x"},
        {"file": "peftjax/b/_y.py", "target": "peftjax.a.pub._hidden"},
        {"file": "peftjax/b/_z.py", "target": "peftjax.a._x"}]}
    assert m["modules_over_600_lines"] == [{"file": "peftjax/b/_long.py", "lines": 601},
                                           {"file": "experiments/_recipe.py", "lines": 700}]
    assert m["recipe_lines"] == 700
    os.remove(os.path.join(root, "experiments", "_recipe.py"))
    assert _script().measure(root, with_imports=False)["recipe_lines"] == "gone"


def test_measures_json_and_public_names_of_this_checkout(tmp_path):
    out = tmp_path / "m.json"
    assert _script().main(["--json", str(out)]) == 0
    m = json.loads(out.read_text())
    import peftjax
    from peftjax import tree
    assert m["public_names"]["peftjax"] == len(peftjax.__all__)
    assert m["public_names"]["peftjax.tree"] == len(tree.__all__)
    assert m["cross_package_private_imports"]["count"] == len(
        m["cross_package_private_imports"]["list"])
