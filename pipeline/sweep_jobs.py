"""One job of a Hydra sweep: W&B grouping, the failure policy, and the end-of-sweep report.

- W&B: every job of a multirun gets `logger.wandb.group = <sweep folder name>` (unless a group was set), so the
  sweep's runs sit together in the W&B UI; the group is also written into the job's config.yaml.
- Failures: a single run raises as usual (nonzero exit). Inside a multirun with `continue_on_failure: true` (the
  default, conf/train.yaml) a failing job is logged with its traceback, its metrics.json says
  `"status": "failed", "error": ...`, the job returns None (Optuna records the trial as failed) and Hydra goes on
  with the next job. `SweepSummary` (a Hydra callback, conf/hydra/default.yaml) then lists every job's status in
  <sweep dir>/sweep_summary.json and makes the sweep exit nonzero when a job failed, after all jobs have run.
  (Left alone, Hydra 1.3 also runs the remaining jobs but then re-raises the first job's error, so no summary is
  written.) `continue_on_failure: false` stops the sweep at the first failing job instead.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, open_dict

from pipeline.ddp_hydra import SWEEP_GROUP_ENV, in_multirun, needs_own_process, run_job_in_own_process

log = logging.getLogger(__name__)


def sweep_group() -> str | None:
    """The W&B group of this job: its sweep folder's name (also inside a relaunched DDP job), else None."""
    if os.environ.get(SWEEP_GROUP_ENV):
        return os.environ[SWEEP_GROUP_ENV]
    if in_multirun():
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().sweep.dir).name
    return None


def apply_sweep_group(cfg: DictConfig) -> None:
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    group = sweep_group()
    if isinstance(wandb_cfg, DictConfig) and group and not wandb_cfg.get("group"):
        with open_dict(cfg):
            wandb_cfg.group = group


def run_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]],
            optimized_value: Callable[[DictConfig, dict[str, Any]], float | None]) -> float | None:
    """train.py's body: train (in its own process for a DDP job of a multirun) and return `optimized_metric`."""
    try:
        if needs_own_process(cfg):
            metrics = run_job_in_own_process(cfg, sweep_group())
        else:
            metrics = train(cfg)
        return optimized_value(cfg, metrics)
    except Exception as err:
        if not in_multirun():
            raise
        job = _job_dir(cfg)
        if not cfg.get("continue_on_failure", True):
            # Hydra's run_job catches every Exception and would go on with the next job; SystemExit is not one
            _mark_failed(job, err)
            raise SystemExit(f"Job {job} failed ({type(err).__name__}: {err}); continue_on_failure=false stops the "
                             f"sweep here. The finished jobs' folders are complete.") from err
        log.exception("Job %s failed (%s: %s); the sweep goes on (continue_on_failure=true). "
                      "Its metrics.json records the error.", job, type(err).__name__, err)
        _mark_failed(job, err)
        # None, not NaN: the Optuna sweeper (1.3.0 + optuna 2.10.1) records a non-float return as a failed trial,
        # while a NaN makes it call study.tell twice and crash the whole sweep
        return None


def _job_dir(cfg: DictConfig) -> Path:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)


def _mark_failed(job: Path, err: BaseException) -> None:
    """Make sure metrics.json says failed (train() writes it, but an error in optimized_value comes later)."""
    from pipeline.run_files import write_metrics_json
    path = job / "metrics.json"
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        payload = {"metrics": {}, "run_dir": str(job)}
    if payload.get("status") != "failed":
        payload.update(status="failed", error=f"{type(err).__name__}: {err}")
        write_metrics_json(path, payload)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Writes <sweep dir>/sweep_summary.json (each job: folder, overrides, status, error, optimized metric), logs
    the failed jobs, and exits nonzero after the sweep when `fail_on_error` and any job failed."""

    def __init__(self, fail_on_error: bool = True):
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        metric = config.get("optimized_metric")
        jobs = []
        for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                              key=lambda p: (len(p.name), p.name)):
            entry: dict[str, Any] = {"dir": job_dir.name}
            try:
                payload = json.loads((job_dir / "metrics.json").read_text())
                entry.update(status=payload.get("status", "unknown"), error=payload.get("error"))
                value = (payload.get("metrics") or {}).get(metric) if metric else None
                entry[metric or "optimized_metric"] = value
            except FileNotFoundError:
                entry.update(status="failed", error="no metrics.json (the job died before writing it)")
            except json.JSONDecodeError as err:
                entry.update(status="failed", error=f"unreadable metrics.json: {err}")
            overrides = job_dir / ".hydra" / "overrides.yaml"
            if overrides.is_file():
                from omegaconf import OmegaConf
                entry["overrides"] = list(OmegaConf.load(overrides))
            jobs.append(entry)
        failed = [j for j in jobs if j["status"] != "completed"]
        summary = {"sweep_dir": str(sweep_dir), "jobs": jobs, "completed": len(jobs) - len(failed),
                   "failed": len(failed)}
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("Sweep %s: %d job(s) completed, %d failed (%s)", sweep_dir, summary["completed"], len(failed),
                 sweep_dir / "sweep_summary.json")
        for job in failed:
            log.error("  job %s (%s) failed: %s", job["dir"], " ".join(job.get("overrides", [])), job.get("error"))
        if failed and self.fail_on_error:
            raise SystemExit(f"{len(failed)} of {len(jobs)} sweep job(s) failed; the other jobs' results are in "
                             f"{sweep_dir} (see sweep_summary.json). Compare them with: python compare.py {sweep_dir}")

