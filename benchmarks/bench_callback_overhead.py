"""What the interpretation callbacks cost a training run: the default model (ProtoPNet) and the cnn, each trained
with `callbacks=minimal` (no interpretation) and `callbacks=default` (every generic callback after every epoch, plus
the model's own), same seed, interleaved (minimal, default, minimal, default, ...) and repeated, so that load from
other processes hits both sides alike. Target: <= 0.10.

    python benchmarks/bench_callback_overhead.py [--models protopnet cnn] [--repeats 3] [-- hydra overrides]

Prints per model: the fit seconds of both (median and min-max over repeats), the end-to-end overhead
(default fit / minimal fit - 1), the run's own `interp/overhead` (callback seconds / training seconds, metrics.json)
and the median seconds of each callback over the run. Each run is `python train.py ... logger=none test=false` in a
temporary folder (W&B and the test pass are not what is measured).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, Spread, result


def train(model: str, callbacks: str, extra: list[str], folder: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), f"model={model}", f"callbacks={callbacks}", "logger=none",
           "test=false", f"hydra.run.dir={folder}", *extra]
    env = dict(os.environ, PROJECT_ROOT=str(ROOT))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads((folder / "metrics.json").read_text())


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["protopnet", "cnn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every run (e.g. trainer.max_epochs=3)")
    args = parser.parse_args()
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for model in args.models:
                for callbacks in ("minimal", "default"):
                    folder = Path(tmp) / f"{model}-{callbacks}-{r}"
                    runs.setdefault((model, callbacks), []).append(train(model, callbacks, args.overrides, folder))
                    m = runs[(model, callbacks)][-1]
                    print(f"  {model} callbacks={callbacks} repeat {r}: training {m['training_seconds']:.1f} s, "
                          f"callbacks {m.get('interp_total_seconds', 0.0):.1f} s", flush=True)
    print(f"\n{'model':<10} {'minimal fit s':>18} {'default fit s':>18} {'end-to-end':>11} {'interp/overhead':>16}  "
          f"per callback, s per run (median)")
    for model in args.models:
        plain, full = runs[(model, "minimal")], runs[(model, "default")]
        fit = lambda m: m["training_seconds"] + sum(m.get("interp_seconds", {}).values())  # noqa: E731
        ratios = [fit(f) / fit(p) - 1 for p, f in zip(plain, full)]
        overhead = [f["interp/overhead"] for f in full]
        names = sorted({n for f in full for n in f.get("interp_seconds", {})})
        per_run = lambda f, n: f["interp_seconds"].get(n, 0.0) / max(1, f["interp_runs"].get(n, 1))  # noqa: E731
        per = ", ".join(f"{n} {statistics.median(per_run(f, n) for f in full):.2f}" for n in names)
        print(f"{model:<10} {spread([fit(p) for p in plain]):>18} {spread([fit(f) for f in full]):>18} "
              f"{statistics.median(ratios):>11.3f} {statistics.median(overhead):>8.3f} "
              f"({min(overhead):.3f}-{max(overhead):.3f})  {per}")
    # the line benchmarks/run_all.py collects: the runs' own interp/overhead of the model that spends the most
    medians = {model: Spread(f["interp/overhead"] for f in runs[(model, "default")]) for model in args.models}
    worst = max(medians, key=lambda m: medians[m].median)
    result("callback_overhead", medians[worst], "training_time", worst=worst, target=0.10,
           **{model: medians[model].median for model in args.models})

if __name__ == "__main__":
    main()
