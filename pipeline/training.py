"""The training pipeline behind train.py: build everything from the config, fit, test, write the run's files.

Kept apart from the @hydra.main entry point so tests and notebooks can call `train(cfg)` on a composed config.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import string
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.checkpoint_io import AtomicCheckpointIO
from pipeline.checkpoints import LAST, LastCheckpoint, epochs_completed, remove_stale_temp_files
from pipeline.interrupts import INTERRUPTS, RunInterrupted
from pipeline.resume import resume_command
from pipeline.report import write_run_report
from pipeline.run_files import scalar_metrics, write_metrics_json
from pipeline.sweep_jobs import apply_sweep_group
from pipeline.validate import validate_config
from pipeline.wandb_setup import configure_wandb, finish_wandb, sync_hint

log = logging.getLogger(__name__)


def global_rank() -> int:
    # set by Lightning's DDP launcher in the processes it starts (before the process group exists)
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers); null entries are skipped."""
    objects = []
    for _, conf in (group or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            objects.append(hydra.utils.instantiate(conf))
    return objects


def instantiate_callbacks(group: DictConfig | None) -> list:
    """The callbacks group; with `callbacks.interpretation=false` (callbacks=minimal) no interpretation callback,
    not even those a model's yaml adds."""
    from callbacks.base import InterpretationCallback
    callbacks = instantiate_group(group)
    if group is not None and not group.get("interpretation", True):
        callbacks = [cb for cb in callbacks if not isinstance(cb, InterpretationCallback)]
    return callbacks


def interpretation_record(trainer, fit_seconds: float | None = None) -> dict[str, Any]:
    """callbacks.base.interpretation_record over the trainer's callbacks (cost, overhead, failures)."""
    from callbacks.base import interpretation_record as record
    return record(trainer.callbacks if trainer is not None else [], fit_seconds)


def check_model_data_agree(cfg: DictConfig, datamodule) -> None:
    for key in ("num_classes", "channels", "image_size"):
        m, d = cfg.model.get(key), getattr(datamodule, key, None)
        if m is not None and d is not None and int(m) != int(d):
            raise ValueError(f"model.{key}={m} disagrees with the data ({cfg_name(cfg, 'datamodule')} has "
                             f"{key}={d}); drop the model.{key} override or set datamodule.{key}")


def cfg_name(cfg: DictConfig, group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.choices.get(group, group)
    except Exception:
        return group


def fill_data_shape(cfg: DictConfig, datamodule) -> None:
    """Settings the data module read from the data itself (imagefolder: num_classes = its class folders), so that the
    model, built from ${datamodule.num_classes}, gets them."""
    for key in ("num_classes",):
        value = getattr(datamodule, key, None)
        if cfg.datamodule.get(key) is None and value is not None:
            with open_dict(cfg):
                cfg.datamodule[key] = int(value)
    if cfg.datamodule.get("num_classes") is None:
        # e.g. imagefolder without its train/ folder: setup() names the folder and the layout it expects
        datamodule.setup("fit")


def run_identity(cfg: DictConfig, datamodule, run_dir: Path) -> dict[str, Any]:
    """What every checkpoint of this run records about it (pipeline/checkpoints.py)."""
    data = cfg_name(cfg, "datamodule")
    return {"model": OmegaConf.select(cfg, "model._target_"), "data": None if data == "datamodule" else data,
            "datamodule": OmegaConf.select(cfg, "datamodule._target_"),
            "num_classes": getattr(datamodule, "num_classes", None), "channels": getattr(datamodule, "channels", None),
            "image_size": getattr(datamodule, "image_size", None), "run_dir": str(run_dir)}


def new_run_id() -> str:
    # W&B's id alphabet (lowercase letters and digits), 8 characters like wandb.util.generate_id
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_previous(run_dir: Path) -> dict[str, Any]:
    """metrics.json of an earlier start in this folder (a resume), else {}."""
    try:
        payload = json.loads((run_dir / "metrics.json").read_text())
        return payload if isinstance(payload, dict) else {}
    except (OSError, ValueError):
        return {}


def attempt_summary(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload.get(k) for k in ("status", "started", "seconds", "epochs_completed", "global_step", "error",
                                        "interrupted_by") if payload.get(k) is not None}


def slurm_plugins(cfg: DictConfig) -> list:
    """SLURM preemption: when the submitit launcher config asks SLURM for USR1 before the end
    (conf/hydra/launcher/slurm.yaml: additional_parameters.signal), Lightning's SLURM environment saves a checkpoint
    on that signal and requeues the job; the requeued job starts in the same folder and resumes from it."""
    import signal as signal_module

    from lightning_fabric.plugins.environments import SLURMEnvironment
    try:
        from hydra.core.hydra_config import HydraConfig
        launcher = HydraConfig.get().launcher
        requested = str(OmegaConf.select(launcher, "additional_parameters.signal", default="") or "")
    except Exception:  # noqa: BLE001 - no Hydra config (tests, notebooks)
        return []
    if not requested or not SLURMEnvironment.detect():
        return []
    name = requested.split("@", 1)[0].strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=getattr(signal_module, name))]


def slurm_requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def build_model_and_data(cfg: DictConfig, run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Seed, then the data module and the model of the config (checked against each other), and the run's identity
    that checkpoints record."""
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    apply_sweep_group(cfg)  # multirun: W&B group = sweep folder name
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    fill_data_shape(cfg, datamodule)
    model = apply_memory_format(hydra.utils.instantiate(cfg.model), cfg.get("channels_last", False))
    check_model_data_agree(cfg, datamodule)
    return datamodule, model, run_identity(cfg, datamodule, run_dir)


def apply_memory_format(model, channels_last: bool):
    """`channels_last: true` stores the model's 4-D weights channels-last (NHWC), so its convolutions run in that
    layout (an NCHW input is converted by the first convolution). On the 2-core CPU a framework training epoch of
    the small backbone is about 1.2x faster (benchmarks/bench_memory_format.py, docs/overhead.md); the values agree
    with NCHW to float rounding (tests/test_memory_format.py)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) the configured model; returns the metrics also written to <run>/metrics.json.

    metrics.json is written when the run starts (status "running", so a killed run still says what it was) and
    when it ends: "completed", "failed" (with the error) or "interrupted" (with the metrics so far, the epochs
    completed and the command that resumes it)."""
    run_dir = Path(cfg.paths.output_dir)
    is_zero = global_rank() == 0
    started = time.time()
    status, error, trainer, metrics, interp = "failed", None, None, {}, None
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}
    wandb_status = None
    INTERRUPTS.install()
    try:
        validate_config(cfg)  # every setting, before anything heavy
        previous = read_previous(run_dir)
        if is_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(run_dir)
        datamodule, model, identity = build_model_and_data(cfg, run_dir)
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path and slurm_requeued() and (run_dir / "checkpoints" / LAST).is_file():
            # a SLURM job requeued after a preemption (slurm_plugins): continue in its folder from last.ckpt, written
            # at the SIGTERM that ended the previous attempt (later than Lightning's hpc checkpoint)
            ckpt_path = str(run_dir / "checkpoints" / LAST)
            with open_dict(cfg):
                cfg.ckpt_path, cfg.resume = ckpt_path, str(run_dir)
        resumed = inspect_checkpoint(ckpt_path, identity, model) if ckpt_path else None
        # one id for a run and every resume of it: W&B continues the same run, compare.py groups the folders
        run_id = ((resumed or {}).get("run_id") or (previous.get("run_id") if cfg.get("resume") else None)
                  or new_run_id())
        identity["run_id"] = run_id
        record.update(run_id=run_id, resumed_from=resumed)
        if cfg.get("resume") and previous:
            record["attempts"] = list(previous.get("attempts") or []) + [attempt_summary(previous)]
        if resumed and is_zero:
            log.info("Resuming run %s from %s (epoch %s done, step %s)", run_id, ckpt_path,
                     resumed.get("epochs_completed"), resumed.get("global_step"))
        elif cfg.get("resume") and is_zero:
            log.info("Restarting run %s in %s from scratch: it stopped before its first checkpoint", run_id, run_dir)
        if is_zero:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            write_record(run_dir, {"status": "running", "metrics": {}, "run_dir": str(run_dir), **record,
                                   **run_info(cfg)})

        callbacks = run_callbacks(cfg, run_dir, identity)
        if "csv" in (cfg.get("logger") or {}) and resumed:
            with open_dict(cfg):
                cfg.logger.csv.keep_before_step = resumed.get("batches_that_stepped")
        loggers, wandb_status = build_loggers(cfg, run_dir, run_id)
        trainer = build_trainer(cfg, callbacks, loggers)

        fit_started = time.perf_counter()
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - fit_started
        metrics.update(scalar_metrics(trainer.callback_metrics))
        # before testing: trainer.test(ckpt_path=best) restores the callbacks' state of that (earlier) checkpoint
        interp = interpretation_record(trainer, fit_seconds)
        if interp["interp_seconds"]:
            if "interp/overhead" in interp:
                metrics["interp/overhead"] = interp["interp/overhead"]
            if is_zero:
                from callbacks.base import overhead_line
                log.info(overhead_line(interp))

        if cfg.get("test", True):
            ckpt = best_checkpoint(trainer)
            test_results = trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt, verbose=is_zero)
            for result in test_results:
                metrics.update(scalar_metrics(result))
        status = "completed"
        return metrics
    except SIGTERMException as err:  # Lightning's own handler, before ours took over (see pipeline/interrupts.py)
        error = RunInterrupted(signal.SIGTERM)
        status = "interrupted"
        raise error from err
    except RunInterrupted as err:
        error, status = err, "interrupted"
        raise
    except BaseException as err:
        error = err
        raise
    finally:
        INTERRUPTS.restore()
        finish_run(cfg, run_dir, status, error, trainer, metrics, interp, record, wandb_status, started)


def run_callbacks(cfg: DictConfig, run_dir: Path, identity: dict[str, Any]) -> list:
    """The callbacks group and LastCheckpoint (last.ckpt after every epoch)."""
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks.append(LastCheckpoint(run_dir / "checkpoints", identity))
    return callbacks


#: refreshes per second of the training progress bar. Lightning's default RichProgressBar redraws from a thread of its
#: own that wakes 100 times a second: 1.5% of a training batch's CPU on the loaded 2-core machine (docs/overhead.md)
PROGRESS_BAR_REFRESH_RATE = 2


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, **trainer_overrides) -> pl.Trainer:
    """The run's Trainer: the trainer group with its callbacks, loggers, the atomic checkpoint writer and, unless
    the callbacks bring their own or `trainer.enable_progress_bar=false`, a progress bar refreshed
    PROGRESS_BAR_REFRESH_RATE times a second (benchmarks/bench_train_throughput.py times this Trainer against a
    plain loop)."""
    enabled = trainer_overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar"))
    if enabled is not False and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        callbacks = [*callbacks, RichProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                   plugins=[AtomicCheckpointIO(), *slurm_plugins(cfg)], **trainer_overrides)


def build_loggers(cfg: DictConfig, run_dir: Path, run_id: str) -> tuple[list, Any]:
    """The logger group; W&B online only when its server accepts the key within the time budget, else offline with
    the sync hint (pipeline/wandb_setup.py), under the run's id so that a resume continues the same W&B run."""
    wandb_status = None
    if "wandb" in (cfg.get("logger") or {}):
        is_zero = global_rank() == 0
        wandb_status = configure_wandb(run_dir, check_network=is_zero)
        if not cfg.logger.wandb.get("id"):  # an id set by the user wins
            with open_dict(cfg):
                cfg.logger.wandb.id = run_id  # WandbLogger resumes it ("allow") when it exists
        if wandb_status.mode == "offline" and is_zero:
            log.warning(sync_hint(run_dir, wandb_status.reason))
    return instantiate_group(cfg.get("logger")), wandb_status


def finish_run(cfg: DictConfig, run_dir: Path, status: str, error: BaseException | None, trainer, metrics: dict,
               interp: dict | None, record: dict, wandb_status, started: float) -> None:
    """The end of every run, whatever ended it: metrics.json (status, metrics, interpretation cost and errors, W&B
    mode, the resume command of an interrupted run), report.html, and W&B closed."""
    is_zero = global_rank() == 0
    if is_zero:
        payload = {"status": status, "metrics": metrics, "run_dir": str(run_dir),
                   "seconds": round(time.time() - started, 2), **record}
        if trainer is not None:
            if status == "interrupted":  # the metrics so far (those of the last epoch and step)
                metrics.update(scalar_metrics(trainer.callback_metrics))
            payload.update(epochs_completed=epochs_completed(trainer), global_step=int(trainer.global_step),
                           world_size=int(trainer.world_size), best_checkpoint=best_checkpoint(trainer),
                           **(interp or interpretation_record(trainer)))
            last = run_dir / "checkpoints" / LAST
            payload["last_checkpoint"] = str(last) if last.is_file() else None
        if wandb_status is not None:
            payload["wandb"] = wandb_status.record()
            fallback = next((lg for lg in (trainer.loggers if trainer is not None else [])
                             if getattr(lg, "fallback_reason", None) or getattr(lg, "disabled_reason", None)),
                            None)
            if fallback is not None:
                payload["wandb"].update(mode="offline" if not fallback.disabled_reason else "off",
                                        reason=fallback.disabled_reason or fallback.fallback_reason)
        payload.update(run_info(cfg))  # also for a job that failed before the trainer existed (sweeps)
        if status == "interrupted":
            payload.update(interrupted_by=error.signal_name, resume_command=resume_command(run_dir))
            log.warning("Run %s. Resume it with: %s", error.describe(), resume_command(run_dir))
        elif error is not None:
            payload["error"] = f"{type(error).__name__}: {error}"
        write_record(run_dir, payload)
    # report.html (and the page on W&B, so before finish_wandb); never raises
    report = write_run_report(run_dir, trainer) if is_zero else None
    finish_wandb(exit_code=0 if status == "completed" else 1)
    if report is not None:
        log.info("report: %s", report)  # the run's last line: the page to open


def write_record(run_dir: Path, payload: dict[str, Any]) -> None:
    """metrics.json; a failure to write it (a full disk) is logged, never raised over the run's own error."""
    try:
        write_metrics_json(run_dir / "metrics.json", payload)
    except OSError as err:
        log.error("could not write %s: %s", run_dir / "metrics.json", err)


def inspect_checkpoint(path, identity: dict[str, Any], model) -> dict[str, Any]:
    """Check the checkpoint to resume (another model or data set is refused, naming both) and describe it for
    metrics.json ("resumed_from") and the CSV logger (the steps it holds)."""
    from pipeline.checkpoints import check_resume_checkpoint, load_for_check
    ckpt = load_for_check(path)
    found = check_resume_checkpoint(path, identity, model, ckpt)
    fit_loop = (ckpt.get("loops") or {}).get("fit_loop") or {}
    epoch_progress = (fit_loop.get("epoch_progress") or {}).get("current") or {}
    return {"checkpoint": str(path), "run_id": found.get("run_id"), "run_dir": found.get("run_dir"),
            "epochs_completed": epoch_progress.get("processed"), "global_step": ckpt.get("global_step"),
            "batches_that_stepped": (fit_loop.get("epoch_loop.state_dict") or {}).get("_batches_that_stepped")}


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The monitored ModelCheckpoint's best file (LastCheckpoint, also a Checkpoint, keeps only last.ckpt)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path and Path(cb.best_model_path).is_file():
            return cb.best_model_path
    return None


def run_info(cfg: DictConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"model": OmegaConf.select(cfg, "model._target_"),
                            "datamodule": OmegaConf.select(cfg, "datamodule._target_")}
    try:
        from hydra.core.hydra_config import HydraConfig
        hc = HydraConfig.get()
        info["overrides"] = list(hc.overrides.task)
        info["choices"] = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    except Exception:
        pass
    return info


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}")
    return metrics[name]
