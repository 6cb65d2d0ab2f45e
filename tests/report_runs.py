"""The short training runs the report tests look at, each trained once and shared by tests/test_report.py and
tests/test_report_browser.py (cached in .test-cache/report/, keyed by a hash of the code and config that decide
what they contain, and guarded by a file lock so two xdist workers never train the same run twice).

- `report_run()`: a 2-epoch ProtoPNet on a small `shapes` set with every interpretation callback after every epoch,
  logged to the CSV logger and to an offline W&B run: unit cards, compositions, prototypes, attribution, featviz,
  histories, W&B panel and table.
- `report_sweep()`: a real `train.py -m` multirun of two 1-epoch cnn jobs (two learning rates) with the default
  callbacks: job pages, the sweep page written by the Hydra callback, compositions side by side.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import CACHE, ROOT, train_run

SMALL = ["datamodule.n_train=480", "datamodule.n_val=120", "datamodule.n_test=120", "datamodule.batch_size=60"]
EVERY_EPOCH = ["callbacks.dissection.every_n_epochs=1", "callbacks.dissection.probe_size=60",
               "callbacks.composability.every_n_epochs=1", "callbacks.attribution.every_n_epochs=1",
               "callbacks.attribution.max_images=24", "callbacks.featviz.every_n_epochs=1", "callbacks.featviz.steps=4",
               "callbacks.featviz.num_units=4", "callbacks.featviz.max_images=24"]
RUN_OVERRIDES = ["model=protopnet", *SMALL, *EVERY_EPOCH, "trainer.max_epochs=2", "model.schedule.last_layer_epochs=1",
                 "callbacks.prototypes.probe_limit=120", "logger=[csv,wandb]"]
SWEEP_OVERRIDES = ["model=cnn", *SMALL, *EVERY_EPOCH, "trainer.max_epochs=1", "logger=csv",
                   "model.optimizer.lr=0.002,0.004"]


def _fingerprint(extra: list[str]) -> str:
    h = hashlib.sha256(repr(extra).encode())
    for folder in ("conf", "core", "models", "datamodules", "algorithms", "callbacks", "pipeline"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    for f in ("train.py", "report.py", "compare.py"):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:12]


def _cached(name: str, overrides: list[str], make) -> Path:
    from filelock import FileLock
    out = CACHE / "report" / f"{name}-{_fingerprint(overrides)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f"{name}.lock")):
        if not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            make(out)
            (out / ".complete").write_text("")
    return out


def report_run() -> Path:
    """The run folder of the short ProtoPNet run (report.html written by train() itself)."""
    return _cached("protopnet", RUN_OVERRIDES, lambda out: train_run(RUN_OVERRIDES, out))


def report_sweep() -> Path:
    """The sweep folder of the two-job multirun (train.py's own process, its Hydra callbacks included)."""
    def make(out: Path) -> None:
        cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SWEEP_OVERRIDES, f"hydra.sweep.dir={out}",
               f"paths.log_dir={out.parent / 'logs'}"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                              text=True, timeout=1200)
        (out / "sweep.log").write_text(proc.stdout + proc.stderr) if out.is_dir() else None
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _cached("sweep", SWEEP_OVERRIDES, make)
