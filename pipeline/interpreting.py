"""The pipeline behind interpret.py: run the configured interpretation callbacks once on a finished model, without
training.

The model is the one `ckpt_path` holds (refused, naming what made it, when it is not the configured model and data),
or the model as the config builds it (`model.pretrained=imagenet|<state dict>` for a pretrained backbone). The
callbacks run inside one validation pass of Lightning, so the same code runs single-process and under DDP (every
rank set up by the strategy, the probe sets sharded as in training) and the pass also reports val/* of the weights
it interpreted. The run folder is the one train.py writes: config.yaml, metrics.json, interp/<callback>/epoch_<NNN>/
(NNN: the epoch of the checkpoint, so that files sit beside those the training run wrote at that epoch), W&B,
report.html.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
import pytorch_lightning as pl
from pytorch_lightning import Callback

from core.errors import ConfigError
from pipeline.checkpoint_io import AtomicCheckpointIO
from pipeline.checkpoints import check_resume_checkpoint, load_for_check
from pipeline.ddp_hydra import in_multirun, needs_own_process
from pipeline.run_files import scalar_metrics
from pipeline.training import (build_loggers, build_model_and_data, finish_run, global_rank, instantiate_callbacks,
                               interpretation_record, new_run_id, run_info, write_record)
from pipeline.validate import validate_config

log = logging.getLogger(__name__)

INTERPRET_FIX = ("give interpret.py the model= and datamodule= options (and model.* settings) the checkpoint was "
                 "trained with: its run folder's .hydra/overrides.yaml lists them")


class InterpretOnce(Callback):
    """Runs every active interpretation callback once, at the end of the validation pass, as the epoch `epoch`
    (the checkpoint's): files go to epoch_<epoch>, and metrics are logged as in training."""

    def __init__(self, epoch: int):
        self.epoch = int(epoch)
        self.ran: list[str] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from callbacks.base import InterpretationCallback
        if trainer.sanity_checking:
            return
        # the epoch the methods see (trainer.current_epoch): the checkpoint's, not 0
        trainer.fit_loop.epoch_progress.current.completed = self.epoch
        for cb in trainer.callbacks:
            if isinstance(cb, InterpretationCallback) and cb.active:
                cb.execute(trainer, pl_module)
                self.ran.append(cb.name)


def checkpoint_epoch(ckpt: dict[str, Any]) -> int:
    """The epoch a checkpoint was written at: Lightning's `epoch` (the 0-based epoch that had just ended)."""
    return int(ckpt.get("epoch") or 0)


def interpret(cfg: DictConfig) -> dict[str, Any]:
    """Interpret the configured model once; returns the metrics also written to <run>/metrics.json."""
    if in_multirun() and needs_own_process(cfg):
        raise ConfigError("interpret.py -m with a DDP trainer is not supported: run each interpretation on its own "
                          "(python interpret.py trainer=ddp_cpu ...), or sweep with trainer=default")
    run_dir = Path(cfg.paths.output_dir)
    is_zero = global_rank() == 0
    started = time.time()
    status, error, trainer, metrics, interp = "failed", None, None, {}, None
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                              "task": "interpret"}
    wandb_status = None
    try:
        validate_config(cfg)
        if is_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
        datamodule, model, identity = build_model_and_data(cfg, run_dir)
        ckpt_path = cfg.get("ckpt_path")
        epoch = 0
        if ckpt_path:
            ckpt = load_for_check(ckpt_path)
            made_by = check_resume_checkpoint(ckpt_path, identity, model, ckpt, fix=INTERPRET_FIX)
            epoch = checkpoint_epoch(ckpt)
            record["interpreted"] = {"checkpoint": str(ckpt_path), "epoch": epoch,
                                     "global_step": ckpt.get("global_step"), "run_id": made_by.get("run_id"),
                                     "run_dir": made_by.get("run_dir")}
            del ckpt
        else:
            record["interpreted"] = {"checkpoint": None, "pretrained": OmegaConf.select(cfg, "model.pretrained")}
        run_id = new_run_id()
        identity["run_id"] = record["run_id"] = run_id
        if is_zero:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            write_record(run_dir, {"status": "running", "metrics": {}, "run_dir": str(run_dir), **record,
                                   **run_info(cfg)})

        from callbacks.base import InterpretationCallback
        methods = [cb for cb in instantiate_callbacks(cfg.get("callbacks")) if isinstance(cb, InterpretationCallback)]
        if not methods:
            raise ConfigError("interpret.py has no interpretation callback to run: callbacks=minimal (or "
                              "callbacks.interpretation=false) leaves none; use callbacks=default or add one")
        driver = InterpretOnce(epoch)
        loggers, wandb_status = build_loggers(cfg, run_dir, run_id)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[*methods, driver], logger=loggers or False,
                                          plugins=[AtomicCheckpointIO()])
        with warnings.catch_warnings():
            # Lightning asks for the checkpoint callbacks of training, which restore nothing a validation pass uses
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
            results = trainer.validate(model=model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=is_zero)
        for result in results:
            metrics.update(scalar_metrics(result))
        metrics.update(scalar_metrics(trainer.callback_metrics))
        interp = interpretation_record(trainer)
        if is_zero:
            skipped = sorted({cb.name for cb in methods} - set(driver.ran))
            not_applicable = f" (not applicable here: {', '.join(skipped)})" if skipped else ""
            log.info("interpreted %s with %s%s", ckpt_path or "the configured model",
                     ", ".join(driver.ran) or "nothing", not_applicable)
        status = "completed"
        return metrics
    except BaseException as err:
        error = err
        raise
    finally:
        finish_run(cfg, run_dir, status, error, trainer, metrics, interp, record, wandb_status, started)
