# SPDX-License-Identifier: Apache-2.0
"""What every benchmark shares: the tiny smoke model, the torch worker, records.

* ``tiny_model(seed, scan_layers=...)``: the smoke-mode Llama
  (``llama.tiny_config(num_hidden_layers=4)``, random, seeded) and its pure
  parameters;
* ``lm_loss(graphdef)``: next-token cross-entropy of a Llama graphdef;
* ``step_bytes(compiled)``: ``argument + output + temp - alias`` of a
  compiled step, the memory figure every benchmark reports;
* ``torch_worker(spec)`` / ``run_torch(spec)``: ``_torch_worker.py`` in the
  side virtualenv ``.venv-torch`` (``make bench-env``), serving steps on
  request or running once; ``torch_model_spec`` describes the model to it;
* ``median``, ``machine()`` (CPU model, core count, Python, JAX and backend:
  every result records where it was measured) and ``write_json``.

The benchmarks import this module as ``_harness`` (their directory is on
``sys.path`` when run as scripts); it imports only peftjax's public API.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCH_ENV = os.path.join(ROOT, ".venv-torch")
TORCH_WORKER = os.path.join(HERE, "_torch_worker.py")
TINY_MODEL = "tiny random Llama (smoke)"
# LlamaConfig.to_hf() keys the torch side builds a random model from
_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings", "max_position_embeddings")


def median(xs: list[float]) -> float | None:
    """The median of ``xs``, ``None`` when nothing was timed."""
    return statistics.median(xs) if xs else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Where a result was measured: CPU model and cores, Python, JAX, backend."""
    import jax

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend()}


def write_json(path: str, result: dict) -> None:
    """Writes ``result`` to ``path`` (creating its directory) when ``path`` is set."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)


def tiny_model(seed: int, *, scan_layers: bool = False, **overrides: Any):
    """``(LlamaConfig, pure params)`` of the smoke-mode model (4 tiny layers)."""
    import jax
    from flax import nnx

    from peftjax import models as pm
    from peftjax.models import llama

    mcfg = llama.tiny_config(**{"num_hidden_layers": 4, **overrides})
    # jitted: eager initialisation compiles one small program per operation
    params = jax.jit(lambda: pm.split_params(llama.LlamaForCausalLM(
        mcfg, scan_layers=scan_layers, rngs=nnx.Rngs(seed)))[1])()
    return mcfg, params


def lm_loss(graphdef):
    """``loss(params, ids)``: mean next-token cross-entropy of ``ids[:, 1:]``."""
    import jax
    import jax.numpy as jnp

    from peftjax import models as pm

    def loss_fn(p, ids):
        logits = pm.apply(graphdef, p, ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return loss_fn


def step_bytes(compiled) -> int:
    """``argument + output + temp - alias`` bytes of a compiled program."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def torch_ready() -> bool:
    """Whether the side virtualenv is built (``.venv-torch/.ready``)."""
    return os.path.exists(os.path.join(TORCH_ENV, ".ready"))


def torch_model_spec(mcfg, ids_np: np.ndarray, gguf: str | None) -> dict:
    """The worker's model and data: the GGUF path or ``mcfg``'s HF config, the ids file.

    The ids are written to a temporary ``.npy`` file (``spec["ids"]``); the
    caller removes it.
    """
    hf = mcfg.to_hf()
    with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
        np.save(f, ids_np)
    return {"gguf": gguf, "ids": f.name, "config": {k: hf[k] for k in _HF_KEYS}}


def _command(spec: dict) -> list[str]:
    return [os.path.join(TORCH_ENV, "bin", "python"), TORCH_WORKER, json.dumps(spec)]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1")


class TorchWorker:
    """A running ``_torch_worker.py`` in serve mode: one training step per ``step()``."""

    def __init__(self, proc: subprocess.Popen, version: str):
        self.proc = proc
        self.version = version

    def step(self) -> tuple[float, float]:
        """Runs one torch step; returns ``(seconds, loss)``."""
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["seconds"], reply["loss"]

    def close(self) -> None:
        """Ends the worker (closing its stdin ends its loop)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def torch_worker(spec: dict) -> tuple[TorchWorker | None, str]:
    """Starts the worker in serve mode; returns ``(worker or None, note)``."""
    if not torch_ready():
        return None, "no torch side environment (.venv-torch/.ready missing)"
    proc = subprocess.Popen(_command({**spec, "mode": "serve"}), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env())
    first = proc.stdout.readline()
    if not first:
        proc.wait()
        return None, f"torch worker failed to start (exit {proc.returncode})"
    return TorchWorker(proc, json.loads(first)["torch"]), ""


def run_torch(spec: dict, *, timeout: float = 1800) -> str:
    """Runs the worker once (``spec["mode"]``: profile, galore); returns its last line.

    Raises:
      subprocess.CalledProcessError: the worker failed (its stderr attached).
    """
    out = subprocess.run(_command(spec), env=_env(), capture_output=True, text=True,
                         timeout=timeout, check=True)
    return out.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit("benchmarks/_harness.py is a module; run one of the benchmarks")
