"""CSVLogger that continues a resumed run's metrics.csv instead of deleting it.

Lightning's CSV writer deletes metrics.csv when its folder is not empty, so a run resumed into its own folder lost
every row logged before the interruption. Here the rows of the steps the checkpoint already holds are kept, and the
rows of steps the resume repeats (logged after the checkpoint by a run that was then killed) are dropped, so that
every step appears once, with the values of the run that continues.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment


class ResumableCSVLogger(CSVLogger):
    """conf/logger/csv.yaml's logger. `keep_before_step` (set by pipeline/training.py from the resumed checkpoint):
    rows with a smaller `step` survive; None = a fresh run (Lightning's behaviour: start a new file)."""

    def __init__(self, *args, keep_before_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept: list[dict[str, str]] = []
        header: list[str] = []
        if self.keep_before_step is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if _step(row) is not None and _step(row) < self.keep_before_step]
        writer = super().experiment  # deletes an existing metrics.csv
        if kept:
            tmp = path.with_name(".metrics.csv.tmp")
            with tmp.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(kept)
            os.replace(tmp, path)
            # the writer appends to an existing file and rewrites it when new columns appear
            writer.metrics_keys = list(header)
        return writer


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step", "")))
    except ValueError:
        return None
