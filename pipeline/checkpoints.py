"""`checkpoints/last.ckpt` after every training epoch and at an interruption, and what each checkpoint says about the
run that wrote it.

- LastCheckpoint writes last.ckpt at the end of every training epoch (after validation and the epoch's callbacks),
  whatever metric the best checkpoint monitors (ProtoPNet monitors val/acc_pushed, which is 0 before the first push:
  a last.ckpt tied to it stayed at epoch 0), and at the step where a SIGINT/SIGTERM is honoured
  (pipeline/interrupts.py).
  The best checkpoint stays with Lightning's ModelCheckpoint (conf/callbacks/minimal.yaml, save_last: false).
- Every checkpoint gets the random-number states of the moment it was written (torch, CUDA, numpy, python); a resume
  from an end-of-epoch checkpoint puts them back before the next epoch's first batch is drawn, and the data module
  restores the generator of its training shuffle (datamodules/base.py), so a killed and resumed run trains on the
  same batches with the same augmentations as an uninterrupted one. (A run stopped by a signal resumes mid-epoch:
  the rest of that epoch is drawn from a new shuffle, as Lightning replays no loader.)
- Every checkpoint records the run's identity (model class, data set, its shape, run id): resuming it with another
  model or data set is refused with a message that names both, before anything is trained.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from core import distributed as D
from core.errors import ConfigError
from pipeline.interrupts import INTERRUPTS, RunInterrupted

log = logging.getLogger(__name__)

LAST = "last.ckpt"
IDENTITY_KEY = "interp_run"


# ----- random-number states -------------------------------------------------------------------------------------------
def collect_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu() if hasattr(states["torch"], "cpu") else states["torch"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----- leftovers of killed writes -------------------------------------------------------------------------------------
def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Temporary files of writes that a kill interrupted (checkpoints and metrics.json are written to a temporary
    file and renamed): removed when a run (re)starts in the folder, before anything writes there."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob("checkpoints/.*.tmp"), *run_dir.glob("metrics.json.tmp"), *run_dir.glob(".*.json.*.tmp")]
    removed = []
    for path in stale:
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        log.info("Removed %d temporary file(s) left by an interrupted write: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


# ----- the callback ---------------------------------------------------------------------------------------------------
class LastCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt` after every training epoch and where an interruption is honoured; see the module
    docstring. A Checkpoint subclass, so Lightning runs it after every other callback's epoch-end hook."""

    def __init__(self, dirpath: str | Path, identity: dict[str, Any] | None = None):
        self.dirpath = Path(dirpath)
        self.identity = dict(identity or {})
        self._rng_to_restore: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    # state travelling in every checkpoint (the best one too)
    def state_dict(self) -> dict[str, Any]:
        return {"rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[IDENTITY_KEY] = dict(self.identity)

    # the training loop
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng_to_restore is not None:
            # resumed: continue the random streams where the checkpointed run was, before Lightning creates the
            # first training iterator (its first batch's augmentations draw from them). The data order itself comes
            # from the data module's own generator, restored with the data module (datamodules/base.py)
            set_rng_states(self._rng_to_restore)
        self._rng_to_restore = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        INTERRUPTS.arm(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the last step of an epoch defers to the epoch end: a checkpoint there would resume as a finished epoch and
        # skip its validation and epoch-end hooks (Lightning's restart rules)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        if D.agree_any(INTERRUPTS.pending, device=pl_module.device):
            self.save(trainer)
            raise self.interrupted(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
        if D.agree_any(INTERRUPTS.pending, device=pl_module.device):
            raise self.interrupted(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        INTERRUPTS.disarm()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        INTERRUPTS.disarm()

    def save(self, trainer: pl.Trainer) -> None:
        """Every rank calls this (Lightning writes on rank 0 and waits for all); loggers flush first, so the CSV and
        W&B history on disk reach at least as far as the checkpoint."""
        for logger in trainer.loggers:
            try:
                logger.save()
            except Exception as err:  # noqa: BLE001 - a logger must never cost the checkpoint
                log.warning("logger %s could not flush before the checkpoint: %s", type(logger).__name__, err)
        trainer.save_checkpoint(str(self.path))

    def interrupted(self, trainer: pl.Trainer) -> RunInterrupted:
        import signal
        return RunInterrupted(INTERRUPTS.signum or signal.SIGTERM, checkpoint=str(self.path),
                              step=int(trainer.global_step), epochs_completed=epochs_completed(trainer))


def epochs_completed(trainer: pl.Trainer) -> int:
    """Training epochs finished (also inside an epoch-end hook, where current_epoch does not count the epoch yet)."""
    return int(trainer.fit_loop.epoch_progress.current.processed)


# ----- identity of the run behind a checkpoint --------------------------------------------------------------------
def short_name(target: str | None) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "?"


def describe(identity: dict[str, Any]) -> str:
    shape = ", ".join(f"{k}={identity[k]}" for k in ("num_classes", "channels", "image_size")
                      if identity.get(k) is not None)
    data = identity.get("data") or short_name(identity.get("datamodule"))
    return f"{short_name(identity.get('model'))} on data set {data}" + (f" ({shape})" if shape else "")


def load_for_check(path: str | Path) -> dict[str, Any]:
    """The checkpoint's content, or an error naming the file and what to do."""
    from pipeline.checkpoint_io import AtomicCheckpointIO
    return AtomicCheckpointIO().load_checkpoint(path, map_location="cpu")


RESUME_FIX = ("resume with the settings it was made with (python train.py resume=<its run folder> reuses them), "
              "or start a new run without ckpt_path")


def check_resume_checkpoint(path: str | Path, expected: dict[str, Any], model: torch.nn.Module,
                            ckpt: dict[str, Any] | None = None, fix: str = RESUME_FIX) -> dict[str, Any]:
    """Refuse a checkpoint of another model or data set (naming both) before anything is trained; returns the
    identity it records ({} for checkpoints written before identities were recorded)."""
    ckpt = load_for_check(path) if ckpt is None else ckpt
    found = ckpt.get(IDENTITY_KEY) or {}
    if found:
        differs = [k for k in ("model", "data", "num_classes", "channels", "image_size")
                   if found.get(k) is not None and expected.get(k) is not None and str(found[k]) != str(expected[k])]
        if differs:
            raise ConfigError(f"ckpt_path={path} was written by {describe(found)}, but this run is "
                              f"{describe(expected)} ({', '.join(differs)} differ); {fix}")
    # also for old checkpoints: the weights must fit this model exactly
    state = ckpt.get("state_dict") or {}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        made_with = describe(found) if found else _guess(ckpt)
        parts = []
        if missing:
            parts.append(f"{len(missing)} of this model's weights are missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights belong to no layer here (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} have other shapes (e.g. {'; '.join(shapes[:2])})")
        raise ConfigError(f"ckpt_path={path} does not fit {describe(expected)}: it was written by {made_with}; "
                          f"{'; '.join(parts)}. To fix: {fix}")
    return found


def _guess(ckpt: dict[str, Any]) -> str:
    """What an identity-less checkpoint says about itself (Lightning stores the hyper-parameters)."""
    hp = ckpt.get("hyper_parameters") or {}
    dm = ckpt.get("datamodule_hyper_parameters") or {}
    keys = {k: hp.get(k) for k in ("num_classes", "channels", "image_size", "backbone") if hp.get(k) is not None}
    text = "another model (" + ", ".join(f"{k}={v}" for k, v in keys.items()) + ")" if keys else "another model"
    if dm.get("data_dir") is not None:
        text += f", data from {dm['data_dir']}"
    return text
