# SPDX-License-Identifier: Apache-2.0
"""PEFT parity of every tuner type with goldens: one table, measured now.

For each ``tests/io/golden/peft_<name>/`` made by the shared golden scripts
(``scripts/golden/_peft_golden.py``), loads PEFT's files for the tiny Llama
(unrolled and scanned) and BERT with ``peftjax.io.load_peft`` and measures
the max |torch - peftjax| output difference materialized and through the
factored path (recording whether that path had to materialize the adapter,
i.e. warned), reads the reverse difference PEFT measured on the
peftjax-written files from ``peft.json``, and compares the trainable count
with PEFT's. Prints a markdown table; ``--json PATH`` also writes the
figures with the CPU model.

Usage: ``PYTHONPATH=. .venv/bin/python scripts/peft_parity_report.py [--json out.json]``
"""

import argparse
import json
import pathlib
import platform
import sys
import warnings

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "golden"))
import _peftjax_golden as pg  # noqa: E402

from peftjax import adapters, factored, io  # noqa: E402

GOLDEN = pg.GOLDEN


def _cpu() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _masked(kind: str, x) -> np.ndarray:
    x = np.asarray(x)
    return x[np.asarray(pg.BERT_IDS) != 0] if kind == "bert" else x


def measure(name: str) -> dict:
    d = GOLDEN / f"peft_{name}"
    ref = np.load(d / "torch_outputs.npz")
    report = json.loads((d / "peft.json").read_text())
    row = {"name": name, "cases": {}, "reverse": {}, "counts": {}, "refused": {}}
    for kind, scanned in (("llama", False), ("llama", True), ("bert", False)):
        if not (d / f"{kind}_{name}").is_dir():
            continue
        _, params, key_map, fwd = pg.load(kind, scanned=scanned)
        key = f"{kind}_{'scanned' if scanned else 'unrolled'}" if kind == "llama" else kind
        ad = io.load_peft(d / f"{kind}_{name}", params, key_map=key_map)
        want = _masked(kind, ref[f"{kind}_{name}"])
        try:
            mat = jax.jit(lambda t, f, a=ad.assignment, p=params: adapters.materialize(
                a, p, t, f))(*ad.state)
        except ValueError as e:  # a file peftjax refuses by design (its test says so)
            row["refused"][key] = str(e).split("\n")[0]
            continue
        raw = fwd.__wrapped__
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fac = jax.jit(lambda t, f, a=ad.assignment, p=params, raw=raw:
                          factored.transform(lambda q, _: raw(q), a, t, f)(p, None))(
                *ad.state)
        row["cases"][key] = {
            "materialized": float(np.abs(_masked(kind, fwd(mat)) - want).max()),
            "factored": float(np.abs(_masked(kind, fac) - want).max()),
            "factored_fell_back": any(issubclass(w.category, factored.FactoredFallbackWarning)
                                      for w in caught),
        }
        n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(ad.state.trainable))
        row["counts"][kind] = {"peftjax": n, "peft": report["trainable_params"][kind]}
    for k, v in report.items():
        if isinstance(v, dict) and "max_abs_diff" in v:
            row["reverse"][k] = v["max_abs_diff"]
    return row


# Goldens of methods that are model hooks or inputs, or need the model
# rebuilt first: their own tests measure them (tests/io/test_peft_<name>.py).
NOT_WEIGHTS = {"alora", "adaption_prompt", "poly", "xlora", "arrow", "prompts",
               "layer_replication"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("names", nargs="*", help="tuners (default: every shared-format golden)")
    args = ap.parse_args()
    names = args.names or sorted(
        p.name[len("peft_"):] for p in GOLDEN.glob("peft_*")
        if p.name[len("peft_"):] not in NOT_WEIGHTS
        and (p / "peft.json").is_file() and isinstance(
            json.loads((p / "peft.json").read_text()).get("trainable_params"), dict)
        and (p / f"llama_{p.name[len('peft_'):]}").is_dir())
    print("| method | factored path | PEFT file -> peftjax (max over cases) | "
          "peftjax file -> PEFT | trainable (peftjax = PEFT) |")
    print("|---|---|---|---|---|", flush=True)
    rows = []
    for n in names:  # one row at a time: a long run shows its progress
        r = measure(n)
        rows.append(r)
        fell = [k for k, c in r["cases"].items() if c["factored_fell_back"]]
        fwd = max(max(c["materialized"], c["factored"]) for c in r["cases"].values())
        rev = max(r["reverse"].values()) if r["reverse"] else float("nan")
        counts = ", ".join(f"{k} {v['peftjax']}{'=' if v['peftjax'] == v['peft'] else '!='}"
                           f"{v['peft']}" for k, v in r["counts"].items())
        how = f"materializes ({', '.join(fell)})" if fell else "factored"
        if r["refused"]:
            how += f"; refused: {', '.join(r['refused'])}"
        print(f"| {r['name']} | {how} | {fwd:.2g} | "
              f"{rev:.2g} | {counts} |", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"cpu": _cpu(), "jax": jax.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
