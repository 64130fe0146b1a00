"""Every file the repository cites is in the repository.

Scans the repository's text files (markdown, Python, notebooks, TOML,
requirements, the Makefile and CI scripts) for

* markdown links ``[text](target)`` to a relative target (with an optional
  ``#anchor``, checked against the headings of a markdown target);
* mentions of a ``*.md`` file or a ``docs/...`` path in prose, code comments
  and docstrings (``see docs/methods.md#galore``);
* the names of design notes that were never part of the repository (a user
  cannot follow them).

A reference resolves if the path exists relative to the citing file's
folder or to the repository root.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Folders that are not the repository's own text (environments, outputs).
_SKIP_DIRS = {".git", ".venv", ".venv-torch", "__pycache__", ".pytest_cache", "build",
              "dist", "demo_out", "node_modules", ".ruff_cache", "checkpoints"}
_EXTS = (".md", ".py", ".ipynb", ".toml", ".txt", ".cfg", ".sh", ".yml", ".yaml")
_NAMES = ("Makefile", "run")
# Large fixtures (golden arrays, corpora) are data, not prose.
_MAX_BYTES = 2_000_000

# Names of private design notes, spelled so that this file does not cite them.
_PRIVATE = [n + ".md" for n in ("DESIGN", "ALGORITHMS", "STYLE", "METHODS", "ANCHORS")]
_PRIVATE_RE = re.compile(r"\b(" + "|".join(re.escape(n) for n in _PRIVATE) + r")")

_LINK_RE = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path-like token ending in .md (optionally with an anchor), or under docs/.
_MD_RE = re.compile(r"(?<![\w/.:\-])((?:\.{1,2}/)?[\w.\-/]*[\w\-]\.md)(#[\w\-]+)?\b")
_DOCS_RE = re.compile(r"(?<![\w/.:\-])(docs/[\w.\-/]*[\w\-])(#[\w\-]+)?")


def _text_files():
    here = os.path.abspath(__file__)
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and not d.endswith(".egg-info")
            and (not d.startswith(".") or d in (".ci", ".github"))
        )
        for name in sorted(filenames):
            if not (name.endswith(_EXTS) or name in _NAMES):
                continue
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) > _MAX_BYTES or path == here:
                continue  # this file's probes cite missing files on purpose
            yield path


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(md_path):
    out, seen = set(), {}
    in_code = False
    for line in _read(md_path).splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', line))
    return out


_BASENAMES: dict = {}


def _by_basename(name):
    """A repository file called ``name`` (a bare name in prose: ``glue.md``)."""
    if not _BASENAMES:
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            for f in filenames:
                _BASENAMES.setdefault(f, os.path.join(dirpath, f))
    return _BASENAMES.get(name)


def _resolve(target, citing):
    """The existing file a relative target names, or None."""
    for base in (os.path.dirname(citing), ROOT):
        cand = os.path.normpath(os.path.join(base, target))
        if cand.startswith(ROOT) and os.path.exists(cand):
            return cand
    if "/" not in target:
        return _by_basename(target)
    return None


def _problems(path, text=None):
    rel = os.path.relpath(path, ROOT)
    text = _read(path) if text is None else text
    out = []
    for m in _PRIVATE_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append(f"{rel}:{line}: cites {m.group(1)}, a file that is not in the repository")

    refs = []  # (line, target, anchor)
    for m in _LINK_RE.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I) or target.startswith("#"):
            continue  # URLs, mailto:, in-page anchors
        if not path.endswith((".md", ".ipynb")) and not re.fullmatch(
                r"[\w.\-/]*[./][\w.\-/]*(#[\w\-]*)?", target):
            continue  # code such as f[x](y), not a link
        target, _, anchor = target.partition("#")
        refs.append((text.count("\n", 0, m.start()) + 1, target, anchor))
    for regex in (_MD_RE, _DOCS_RE):
        for m in regex.finditer(text):
            before = text[max(0, m.start() - 80):m.start()]
            if re.search(r"(https?://|github\.com/)\S*$", before):
                continue  # part of a URL
            anchor = (m.group(2) or "#")[1:]
            refs.append((text.count("\n", 0, m.start()) + 1, m.group(1), anchor))
    for line, target, anchor in refs:
        if any(c in target for c in "*{}$<>") or not target or _PRIVATE_RE.search(target):
            continue  # globs and templates
        found = _resolve(target, path)
        if found is None:
            out.append(f"{rel}:{line}: cites {target!r}, which is not in the repository")
        elif anchor and found.endswith(".md") and anchor not in _anchors(found):
            out.append(f"{rel}:{line}: cites {target}#{anchor}: no such heading in {target}")
    return list(dict.fromkeys(out))  # a path can match both patterns


def test_no_reference_to_a_missing_file():
    files = list(_text_files())
    assert any(f.endswith("README.md") for f in files) and len(files) > 50
    problems = [p for f in files for p in _problems(f)]
    assert not problems, "\n".join(problems)


def test_heading_anchors_follow_github(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Top\n## Some section\n```\n# not a heading\n```\n## Some section\n")
    assert _anchors(str(doc)) == {"top", "some-section", "some-section-1"}
    assert _slug("GaLore `proj_type` (side table)") == "galore-proj_type-side-table"


@pytest.mark.parametrize("snippet, bad", [
    ("see [the notes](docs/nowhere.md)", True),
    ("see docs/nowhere.md", True),
    ("see docs/nowhere/", True),
    ("see " + "DESIGN" + ".md section 2", True),
    ("(" + "STYLE" + ".md B9.4)", True),
    ("see [Quickstart](README.md#quickstart-a-dict-of-arrays-model-optaxadamw)", False),
    ("see [x](README.md#no-such-heading)", True),
    ("see [x](peftjax/optim/_galore.py)", False),
    ("https://github.com/x/y/blob/main/NOTES.md", False),
    ("[paper](https://arxiv.org/abs/2403.03507)", False),
])
def test_scanner_flags_what_it_should(snippet, bad):
    problems = _problems(os.path.join(ROOT, "README.md"), text=snippet)
    assert bool(problems) is bad, problems


def test_api_reference_includes_the_galore_side_table():
    # `make docs` renders public docstrings only (private modules are
    # excluded), so the proj_type table must live in a public one.
    from peftjax import optim

    doc = optim.scale_by_galore.__doc__
    for name in optim.PROJ_TYPES:
        assert f"| ``{name}`` |" in doc, name
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        make = f.read()
    modules = re.search(r"DOC_MODULES :=(.*?)\n\S", make, re.S).group(1).split()
    assert "peftjax.optim" in modules, modules


def test_every_docs_page_is_linked_from_the_index():
    # README -> docs/README.md -> every page, so no page is orphaned.
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "(docs/README.md)" in f.read()
    docs = os.path.join(ROOT, "docs")
    with open(os.path.join(docs, "README.md"), encoding="utf-8") as f:
        index = f.read()
    linked = {m.split("#")[0] for m in _LINK_RE.findall(index)}
    pages = {n for n in os.listdir(docs) if n.endswith(".md") and n != "README.md"}
    assert pages <= linked, sorted(pages - linked)
