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
                 "callbacks.prototypes.probe_limit=120", "logger=[csv,wandb]",
                 # featviz of the dissected layer's units (ProtoPNet's yaml visualises its prototypes), for unit cards
                 "callbacks.featviz.layer=null"]
SWEEP_OVERRIDES = ["model=cnn", *SMALL, *EVERY_EPOCH, "trainer.max_epochs=1", "logger=csv",
                   "model.optimizer.lr=0.002,0.004"]


def _fingerprint(extra: list[str]) -> str:
    """What decides the training outputs; the report code is left out (a reused run gets its pages rebuilt)."""
    h = hashlib.sha256(repr(extra).encode())
    for folder in ("conf", "core", "models", "datamodules", "algorithms", "callbacks", "pipeline"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts and "report" not in f.parts:
                h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    for f in ("train.py", "compare.py"):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:12]


def _cached(name: str, overrides: list[str], make, rebuild) -> Path:
    """The folder trained by `make` for this code, or the cached one with its pages rebuilt by `rebuild` (a fresh
    run's pages are the ones the run wrote itself)."""
    from filelock import FileLock
    out = CACHE / "report" / f"{name}-{_fingerprint(overrides)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f"{name}.lock")):
        if not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            make(out)
            (out / ".complete").write_text(str(os.getpid()))
        elif (out / ".complete").read_text() != str(os.getpid()):  # once per test session and process
            rebuild(out)
            (out / ".complete").write_text(str(os.getpid()))
    return out


def report_run() -> Path:
    """The run folder of the short ProtoPNet run (report.html written by train() itself)."""
    from pipeline.report import build_run_report
    return _cached("protopnet", RUN_OVERRIDES, lambda out: train_run(RUN_OVERRIDES, out), build_run_report)


def report_sweep() -> Path:
    """The sweep folder of the two-job multirun (train.py's own process, its Hydra callbacks included)."""
    def make(out: Path) -> None:
        cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SWEEP_OVERRIDES, f"hydra.sweep.dir={out}",
               f"paths.log_dir={out.parent / 'logs'}"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                              text=True, timeout=1200)
        (out / "sweep.log").write_text(proc.stdout + proc.stderr) if out.is_dir() else None
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    def rebuild(out: Path) -> None:
        import report
        report.build_sweep_report(out, rebuild_jobs=True)
    return _cached("sweep", SWEEP_OVERRIDES, make, rebuild)


def other_models_run(folder: Path) -> Path:
    """A run folder holding what the capsule, ICNN and Dynamic-K callbacks write (typed results + figures), built
    directly from the result classes, for the sections a ProtoPNet or cnn run does not have (no training)."""
    import json

    from PIL import Image, ImageDraw

    from algorithms.capsules import CapsulesResult
    from algorithms.dynk_stats import DynKStats
    from algorithms.icnn_metrics import ICNNMetricsResult

    def figure(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (300, 120), (255, 255, 255))
        ImageDraw.Draw(im).rectangle((20, 20, 200, 100), fill=(200, 40, 40))
        im.save(path)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "metrics": {"val/acc": 0.9},
                                                     "choices": {"model": "capsnet", "datamodule": "digits"}}))
    caps = folder / "interp" / "capsules" / "epoch_001"
    CapsulesResult(epoch=1, perturbations=[-0.25, 0.0, 0.25], metrics={"reconstruction_sse": 12.5},
                   images=[{"index": n, "label": n, "predicted": n, "lengths": [0.1] * 10, "reconstruction_sse": 12.5,
                            "perturbation_change_per_dim": [0.01 * d for d in range(16)],
                            "coupling_to_prediction_grid": [[0.1]]} for n in range(3)]).save(caps / "capsules.json")
    figure(caps / "perturbation_00.png")
    figure(caps / "coupling_heatmap.png")
    icnn = folder / "interp" / "icnn" / "epoch_001"
    ICNNMetricsResult(epoch=1, layer="icnn.filters2", metrics={"location_instability": 0.12, "live_filters": 2.0},
                      filters=[{"filter": f, "location_instability": 0.1, "part_interpretability": 0.5,
                                "best_part": "circle-top", "threshold": 0.3, "class": f} for f in range(2)],
                      top_k=5, quantile=0.005, iou_threshold=0.04).save(icnn / "icnn_metrics.json")
    figure(icnn / "filter_peaks.png")
    DynKStats(epoch=1, k=5, fraction=0.9, metrics={"units_for_90pct": 4.5}, zero_tolerance=1e-3,
              per_class=[{"class": c, "nonzero_weights": 5, "units_for_90pct": 4.0, "predicted_images": 10}
                         for c in ("zero", "one")],
              examples=[{"predicted": 1, "score": 3.0, "bias": 0.5, "evidence": 2.5, "units": [3, 7],
                         "unit_names": ["red", None], "contributions": [1.5, 1.0], "shares": [0.6, 0.4]}]
              ).save(folder / "interp" / "dynconn" / "epoch_001" / "dynconn.json")
    return folder
