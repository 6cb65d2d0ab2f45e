"""DDP jobs inside a Hydra multirun: each job runs in its own process, so its DDP children run only that job.

Why (Lightning issue 11300): Lightning's subprocess-script launcher starts ranks 1..N-1 by re-running the command line
(`_hydra_subprocess_cmd`: sys.argv + `hydra.run.dir=<run.dir>`). Under `python train.py -m a=1,2` that command line is
the whole sweep (`-m` included), and `hydra.run.dir` is the *run* pattern, not the job's folder: every child starts
the full sweep in fresh timestamped folders. Fixing only the command line is not enough either: after job 1 the
launcher process keeps LOCAL_RANK/MASTER_PORT/WORLD_SIZE in os.environ and its default process group stays
initialised, so job 2 believes its processes were "created externally", launches no children and hangs; and
Lightning's child-process observer SIGKILLs the launching process when a child fails, which would end the sweep.

What we do instead: a multirun job whose trainer would launch script children re-runs *this job only* as one
`python train.py <the job's overrides> hydra.run.dir=<the job's folder>` process in RUN mode, where Lightning's
launcher works as designed, waits for it and reads its metrics.json. The job folder keeps Hydra's .hydra/ files
(written by the sweep process; the child is started with hydra.output_subdir=null), every job starts from a clean
environment, and a crashing job takes down only its own processes.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Hydra overrides that describe the sweep itself, not the job's configuration: the relaunched job runs in RUN mode.
SWEEP_ONLY_OVERRIDES = ("hydra.mode", "hydra.sweep", "hydra/sweeper", "hydra.sweeper", "hydra/launcher",
                        "hydra.launcher", "hydra.run.dir", "hydra.job.name", "hydra.output_subdir", "hydra.job.num",
                        "hydra.job.id", "hydra.callbacks")
# command-line flags that pick the primary config; they are not overrides, so Hydra does not record them
CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
# environment variable through which the relaunched job learns its sweep's W&B group (see pipeline/sweep_jobs.py)
SWEEP_GROUP_ENV = "INTERP_SWEEP_GROUP"


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # pragma: no cover - hydra internals moved
        return False


def launches_script_children(trainer_cfg: DictConfig) -> bool:
    """True when a Trainer built from `trainer_cfg` would re-run the script for its other ranks.

    Decided by building a bare Trainer (no loggers, no callbacks) from the config's accelerator/devices/strategy and
    asking Lightning which launcher it chose, instead of guessing from strategy names (ddp, fsdp, deepspeed, custom
    DDPStrategy objects and cluster environments all decide this differently)."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    kwargs = {k: trainer_cfg[k] for k in keys if trainer_cfg.get(k) is not None}
    if isinstance(kwargs.get("strategy"), DictConfig):
        kwargs["strategy"] = hydra.utils.instantiate(kwargs["strategy"])
    quiet = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        probe = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, **kwargs)
    finally:
        quiet.setLevel(level)
    strategy = probe.strategy
    return (isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher)
            and not strategy.cluster_environment.creates_processes_externally)


def needs_own_process(cfg: DictConfig) -> bool:
    return in_multirun() and launches_script_children(cfg.trainer)


def _keep(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return not any(key == k or key.startswith(k + ".") for k in SWEEP_ONLY_OVERRIDES)


def config_flags(argv: list[str]) -> list[str]:
    """The -cp/-cn/-cd flags of the sweep's command line (with their values)."""
    flags, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in CONFIG_FLAGS:
            flags.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        i += 1
    return flags


def quote_value(value: str) -> str:
    # Hydra's override grammar: a quoted string keeps '=', ',', spaces and ':' of a path literal
    return f"'{value}'" if '"' in value else f'"{value}"'


def job_command(job_dir: Path) -> list[str]:
    """The command line that runs exactly the current multirun job, in RUN mode, in `job_dir`."""
    from hydra.core.hydra_config import HydraConfig
    import __main__

    hc = HydraConfig.get()
    if getattr(__main__, "__spec__", None) is not None and __main__.__spec__.name != "__main__":
        command = [sys.executable, "-m", __main__.__spec__.name]
    else:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    command += config_flags(sys.argv[1:])
    command += [o for o in hc.overrides.hydra if _keep(o)]
    command += list(hc.overrides.task)
    # hydra.mode=RUN: a config such as hparams_search/optuna sets hydra.mode=MULTIRUN, which would start a sweep
    command += ["hydra.mode=RUN", f"hydra.run.dir={quote_value(str(job_dir))}", f"hydra.job.name={hc.job.name}",
                "hydra.output_subdir=null"]
    return command


def run_job_in_own_process(cfg: DictConfig, sweep_group: str | None) -> dict[str, Any]:
    """Run the current multirun job as `python train.py <job overrides>` in its folder; returns its metrics.

    Raises RuntimeError naming the job folder when the job failed (metrics.json then says why)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    from pipeline.run_files import write_metrics_json

    job_dir = Path(HydraConfig.get().runtime.output_dir)
    command = job_command(job_dir)
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(key, None)  # a clean start: Lightning decides from these whether it must launch the ranks
    if sweep_group:
        env[SWEEP_GROUP_ENV] = sweep_group
    log.info("DDP job %s runs in its own process: %s", job_dir.name, " ".join(command))
    metrics_file = job_dir / "metrics.json"
    if metrics_file.exists():
        metrics_file.unlink()  # never mistake an older attempt's file for this job's result
    proc = subprocess.run(command, cwd=get_original_cwd(), env=env)
    payload = None
    if metrics_file.is_file():
        try:
            payload = json.loads(metrics_file.read_text())
        except json.JSONDecodeError:
            payload = None
    if proc.returncode == 0 and payload and payload.get("status") == "completed":
        return payload["metrics"]
    error = (payload or {}).get("error") or f"the job's process exited with code {proc.returncode}"
    if not payload or payload.get("status") != "failed":
        write_metrics_json(metrics_file, {"status": "failed", "metrics": (payload or {}).get("metrics", {}),
                                          "run_dir": str(job_dir), "error": error,
                                          "overrides": list(HydraConfig.get().overrides.task)})
    raise RuntimeError(f"DDP job in {job_dir} failed: {error} (log: {job_dir / (cfg.get('task_name', 'train') + '.log')})")
