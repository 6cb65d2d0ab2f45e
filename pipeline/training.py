"""The training pipeline behind train.py: build everything from the config, fit, test, write the run's files.

Kept apart from the @hydra.main entry point so tests and notebooks can call `train(cfg)` on a composed config.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from pipeline.checkpoint_io import AtomicCheckpointIO
from pipeline.report import write_run_report
from pipeline.run_files import scalar_metrics, write_metrics_json
from pipeline.sweep_jobs import apply_sweep_group
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


def interpretation_record(trainer) -> dict[str, Any]:
    """What the interpretation callbacks cost and which of them failed, for metrics.json: `interp_seconds` and
    `interp_runs` per callback, `interp_errors` (callback, epoch, rank, error, traceback)."""
    from callbacks.base import InterpretationCallback
    cbs = [cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, InterpretationCallback)]
    return {"interp_seconds": {cb.name: round(cb.seconds, 3) for cb in cbs if cb.runs},
            "interp_runs": {cb.name: cb.runs for cb in cbs if cb.runs},
            "interp_errors": [e for cb in cbs for e in cb.errors]}


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) the configured model; returns the metrics also written to <run>/metrics.json."""
    run_dir = Path(cfg.paths.output_dir)
    is_zero = global_rank() == 0
    if is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    status, error, trainer, metrics, interp = "failed", None, None, {}, None
    try:
        if cfg.get("seed") is not None:
            pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        apply_sweep_group(cfg)  # multirun: W&B group = sweep folder name
        if is_zero:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

        datamodule = hydra.utils.instantiate(cfg.datamodule)
        model = hydra.utils.instantiate(cfg.model)
        check_model_data_agree(cfg, datamodule)
        callbacks = instantiate_callbacks(cfg.get("callbacks"))
        if "wandb" in (cfg.get("logger") or {}):
            mode = configure_wandb(run_dir)
            if mode == "offline" and is_zero:
                log.warning(sync_hint(run_dir))
        loggers = instantiate_group(cfg.get("logger"))
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                          plugins=[AtomicCheckpointIO()])

        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(scalar_metrics(trainer.callback_metrics))
        # before testing: trainer.test(ckpt_path=best) restores the callbacks' state of that (earlier) checkpoint
        interp = interpretation_record(trainer)

        if cfg.get("test", True):
            ckpt = best_checkpoint(trainer)
            test_results = trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt, verbose=is_zero)
            for result in test_results:
                metrics.update(scalar_metrics(result))
        status = "completed"
        return metrics
    except BaseException as err:
        error = err
        raise
    finally:
        if is_zero:
            payload = {"status": status, "metrics": metrics, "run_dir": str(run_dir),
                       "seconds": round(time.time() - started, 2)}
            if trainer is not None:
                payload.update(epochs_completed=int(trainer.current_epoch), global_step=int(trainer.global_step),
                               world_size=int(trainer.world_size),
                               best_checkpoint=best_checkpoint(trainer), **(interp or interpretation_record(trainer)))
            payload.update(run_info(cfg))  # also for a job that failed before the trainer existed (sweeps)
            if error is not None:
                payload["error"] = f"{type(error).__name__}: {error}"
            write_metrics_json(run_dir / "metrics.json", payload)
        # report.html (and the page on W&B, so before finish_wandb); never raises
        report = write_run_report(run_dir, trainer) if is_zero else None
        finish_wandb()
        if report is not None:
            log.info("report: %s", report)  # the run's last line: the page to open


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
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
