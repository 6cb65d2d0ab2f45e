"""Per-epoch metric histories of a run, from what the run folder holds, in this order of preference:

1. the CSV logger's `csv/metrics.csv` (logger=csv): every logged value with its epoch;
2. the W&B run's own transaction log (`wandb/*run-*/run-*.wandb`, offline or online), read without the network by
   pipeline/wandb_offline.py;
3. the interpretation results themselves (`interp/<callback>/epoch_NNN/*.json`, through their typed classes): the
   interp/* metrics only, without val/acc.

Only epoch-level names are kept: val/*, interp/* and train/*_epoch; test/* is one value and is in metrics.json.
"""
from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

History = dict[str, dict[int, float]]   # metric -> epoch -> value


def _keep(name: str) -> bool:
    return name.startswith(("val/", "interp/")) or (name.startswith("train/") and name.endswith("_epoch"))


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _add(hist: History, row: dict, epoch_key: str = "epoch") -> None:
    epoch = _number(row.get(epoch_key))
    if epoch is None:
        return
    for k, v in row.items():
        if _keep(k):
            f = _number(v)
            if f is not None:
                hist.setdefault(k, {})[int(epoch)] = f   # the last value logged in an epoch wins


def from_csv(run: Path) -> History:
    hist: History = {}
    for path in sorted(run.glob("csv/**/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                _add(hist, row)
    return hist


def wandb_log_file(run: Path) -> Path | None:
    files = sorted(run.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def from_wandb(run: Path) -> History:
    path = wandb_log_file(run)
    if path is None:
        return {}
    from pipeline.wandb_offline import read_history
    hist: History = {}
    for row in read_history(path):
        _add(hist, row)
    return hist


def epoch_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of every epoch_NNN below `folder`, oldest first."""
    out = []
    if folder.is_dir():
        for d in folder.iterdir():
            m = re.fullmatch(r"epoch_(\d+)", d.name)
            if m and d.is_dir():
                out.append((int(m.group(1)), d))
    return sorted(out)


def result_metrics(result) -> dict[str, float]:
    """The scalars a typed result's callback logs (its `interp/<callback>/` names without the prefix)."""
    from algorithms.attribution.result import AttributionResult
    from algorithms.dissection_result import DissectionEpoch
    from algorithms.prototypes import PrototypeQuality
    if isinstance(result, DissectionEpoch):
        out = {}
        for i, (layer, res) in enumerate(result.layers.items()):
            s = res.summary()
            if i == 0:
                out.update(s)
            if len(result.layers) > 1:
                out.update({f"{layer}/{k}": v for k, v in s.items()})
        return out
    if isinstance(result, AttributionResult):
        return result.flat()
    if isinstance(result, PrototypeQuality):
        return result.metrics()
    metrics = getattr(result, "metrics", None)
    if callable(metrics):
        metrics = metrics()
    return dict(metrics) if isinstance(metrics, dict) else {}


def from_results(run: Path) -> History:
    import algorithms  # noqa: F401  (registers every result schema for load_result)
    from core.results import SchemaError, load_result
    hist: History = {}
    for cb in sorted(p for p in (run / "interp").glob("*") if p.is_dir()):
        for epoch, folder in epoch_dirs(cb):
            for path in sorted(folder.glob("*.json")):
                try:
                    result = load_result(path)
                except SchemaError:
                    continue
                for k, v in result_metrics(result).items():
                    f = _number(v)
                    if f is not None:
                        hist.setdefault(f"interp/{cb.name}/{k}", {})[epoch] = f
    return hist


SOURCES: list[tuple[str, Callable[[Path], History]]] = [
    ("CSV logger (csv/metrics.csv)", from_csv), ("W&B run log", from_wandb), ("interpretation result files",
                                                                                  from_results)]


def metric_history(run: Path) -> tuple[str, History]:
    """(where it came from, history) from the first source that has per-epoch values; ("", {}) when none."""
    for name, read in SOURCES:
        try:
            hist = read(run)
        except Exception as err:  # noqa: BLE001 - a damaged log: try the next source
            log.warning("report: could not read the %s of %s (%s: %s)", name, run, type(err).__name__, err)
            continue
        if any(hist.values()):
            return name, hist
    return "", {}
