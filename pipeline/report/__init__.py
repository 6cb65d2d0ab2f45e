"""report.html: one self-contained page per run folder (and per sweep, report.py), written at the end of every run.

    build_run_report(run_dir)          # writes <run>/report.html and returns (path, RunReport); raises on failure
    write_run_report(run_dir, trainer) # the pipeline's call: never raises; also logs the page to W&B

The page reads only the run folder (metrics.json, config.yaml, the callbacks' typed results and figures, the CSV or
W&B log for the histories), so `python report.py <run>` rebuilds the same page later, also for failed and
interrupted runs. Images are embedded, so the file can be copied anywhere on its own.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPORT = "report.html"


def build_run_report(run_dir: str | Path):
    """Write `<run_dir>/report.html` atomically; returns (path, the RunReport it was built from)."""
    from pipeline.report.images import open_rgb
    from pipeline.report.run_page import RunReport
    run_dir = Path(run_dir)
    try:
        report = RunReport(run_dir)
        path = run_dir / REPORT
        tmp = path.with_name(f".{REPORT}.{os.getpid()}.tmp")
        tmp.write_text(report.html(), encoding="utf-8")
        tmp.replace(path)
    finally:
        open_rgb.cache_clear()   # figures decoded for this build only: a later build reads the files again
    return path, report


def write_run_report(run_dir: str | Path, trainer=None) -> Path | None:
    """The run's page, and on a W&B logger of `trainer` the page as an HTML panel + artifact and the unit cards as
    a table. A failure is logged, never raised: the report must not fail or lose a run that trained."""
    started = time.perf_counter()
    try:
        path, report = build_run_report(run_dir)
    except Exception as err:  # noqa: BLE001 - see docstring
        log.error("report: could not write %s (%s: %s); rebuild it with python report.py %s",
                  Path(run_dir) / REPORT, type(err).__name__, err, run_dir, exc_info=True)
        return None
    seconds = time.perf_counter() - started
    log.info("report: written in %.1f s, %.1f MB", seconds, path.stat().st_size / 1e6)
    if trainer is not None:
        try:
            from pipeline.report.wandb_log import log_report
            started = time.perf_counter()
            if log_report(trainer, path, report):
                log.info("report: logged to W&B in %.1f s", time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001 - W&B is optional and never blocking
            log.warning("report: not logged to W&B (%s: %s)", type(err).__name__, err)
    return path
