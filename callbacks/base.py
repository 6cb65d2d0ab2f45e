"""The frame every interpretation callback shares: when to run, how to run safely inside training (gradients on,
outside inference mode, eval mode restored, parameter grads untouched, hooks removed), how to shard the probe set
across ranks, how to fail on every rank together, and where results go (run folder + W&B).

A subclass implements `run(trainer, module, epoch) -> dict[str, float]`: it computes on `self.shard(dataset)`,
reduces with callbacks.distributed, renders/writes on rank 0 (`self.is_rank_zero`) into `self.epoch_dir(...)`, and
returns scalar metrics that are identical on every rank. The base logs them as `interp/<name>/<metric>`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import traceback
from pathlib import Path
from typing import Any, Iterable

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, Subset

from callbacks import distributed as D

log = logging.getLogger(__name__)


class InterpretationError(RuntimeError):
    """An interpretation callback failed; raised on every rank so that none is left waiting in a collective."""


@contextlib.contextmanager
def interpretation_mode(module: torch.nn.Module):
    """Gradients enabled and inference mode off (Lightning runs validation under inference_mode on GPUs); eval mode
    for the duration; train/eval flags, requires_grad flags and every parameter's .grad restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    requires = {p: p.requires_grad for p in module.parameters()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            module.eval()
            yield module
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in requires.items():
            p.requires_grad_(flag)
        for p, g in grads.items():
            p.grad = g


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None):
    """The random streams of torch (CPU and the module's CUDA device), Python and NumPy are restored afterwards, so
    an interpretation method that draws random numbers (sampling, random init, randomisation tests) leaves the
    training run exactly as it would have been without it."""
    import random

    import numpy as np
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def forward_hooks(modules: Iterable[torch.nn.Module], hook):
    """Register `hook` on each module; the handles are removed even when the body raises."""
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield handles
    finally:
        for h in handles:
            h.remove()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


class InterpretationCallback(Callback):
    """Runs an interpretation method every `every_n_epochs` training epochs (and after the last one)."""

    name: str = "interp"

    def __init__(self, every_n_epochs: int = 1, run_on_last_epoch: bool = True, enabled: bool = True,
                 batch_size: int = 64):
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.{self.name}.every_n_epochs={every_n_epochs}: must be >= 1")
        self.every_n_epochs = int(every_n_epochs)
        self.run_on_last_epoch = run_on_last_epoch
        self.enabled = enabled
        self.batch_size = int(batch_size)
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    # ----- scheduling -------------------------------------------------------------------------------------------
    def applies_to(self, module: LightningModule) -> bool:
        """Whether this method makes sense for the model (e.g. prototype galleries need a ProtoPNet)."""
        return True

    def should_run(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return self.enabled and (epoch % self.every_n_epochs == 0 or (self.run_on_last_epoch and last))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.should_run(trainer) or not self.applies_to(pl_module):
            return
        self.execute(trainer, pl_module)

    def execute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Run the method now (also usable outside the schedule), log and remember its scalars."""
        epoch = trainer.current_epoch
        error: BaseException | None = None
        metrics: dict[str, float] = {}
        with interpretation_mode(pl_module), preserved_rng(pl_module.device):
            try:
                metrics = self.run(trainer, pl_module, epoch) or {}
            except Exception as err:  # collected, then raised on every rank together
                error = err
                log.error("callback %s failed on rank %d:\n%s", self.name, D.rank(), traceback.format_exc())
        if D.any_rank(error is not None, device=pl_module.device):
            where = f"on rank {D.rank()}" if error is not None else "on another rank"
            raise InterpretationError(f"interpretation callback '{self.name}' failed {where} at epoch {epoch}: "
                                      f"{error!r}" if error else f"interpretation callback '{self.name}' failed "
                                      f"{where} at epoch {epoch}; see that rank's log") from error
        self.last_metrics = {f"interp/{self.name}/{k}": float(v) for k, v in metrics.items()}
        self.history.append({"epoch": epoch, **self.last_metrics})
        for key, value in self.last_metrics.items():
            # identical on every rank (reduced by run), so no sync is needed
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)
        return self.last_metrics

    def run(self, trainer: Trainer, module: LightningModule, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    # ----- data -----------------------------------------------------------------------------------------------
    @staticmethod
    def shard(dataset: Dataset) -> Subset:
        """This rank's contiguous part of the probe set (no padding, no repetition)."""
        return Subset(dataset, D.shard_indices(len(dataset)))

    def loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=False, num_workers=0)

    @staticmethod
    def datamodule(trainer: Trainer):
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            raise InterpretationError("interpretation callbacks need the run's datamodule (trainer.fit(model, datamodule=...))")
        return dm

    # ----- outputs --------------------------------------------------------------------------------------------
    @property
    def is_rank_zero(self) -> bool:
        return D.rank() == 0

    def epoch_dir(self, trainer: Trainer, epoch: int) -> Path:
        """<run folder>/interp/<name>/epoch_<NNN>/ (created on rank 0 only)."""
        path = Path(trainer.default_root_dir) / "interp" / self.name / f"epoch_{epoch:03d}"
        if self.is_rank_zero:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, iterable, desc: str, total: int | None = None):
        """A progress bar on rank 0 only."""
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=f"{self.name}: {desc}", total=total, leave=False, disable=not self.is_rank_zero)

    @staticmethod
    def wandb_loggers(trainer: Trainer) -> list:
        from pytorch_lightning.loggers import WandbLogger
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def log_images(self, trainer: Trainer, key: str, paths: list[Path | str], captions: list[str] | None = None):
        """Rank 0 only: PNG files to W&B under `interp/<name>/<key>`, stepped by the trainer's global step."""
        if not self.is_rank_zero:
            return
        loggers = self.wandb_loggers(trainer)
        if not loggers or not paths:
            return
        from PIL import Image
        sizes = set()
        for p in paths:
            with Image.open(p) as im:
                sizes.add(im.size)
        # W&B shows one image list per key and needs equal sizes in it: figures of different sizes get a key each
        groups = [(f"interp/{self.name}/{key}", list(paths), captions)] if len(sizes) == 1 else [
            (f"interp/{self.name}/{key}/{Path(p).stem}", [p], [captions[i]] if captions else None)
            for i, p in enumerate(paths)]
        for lg in loggers:
            for wandb_key, group, caps in groups:
                extra = {"caption": list(caps)} if caps else {}
                lg.log_image(key=wandb_key, images=[str(p) for p in group], step=trainer.global_step, **extra)

    def log_table(self, trainer: Trainer, key: str, columns: list[str], rows: list[list]):
        if not self.is_rank_zero:
            return
        for lg in self.wandb_loggers(trainer):
            lg.log_table(key=f"interp/{self.name}/{key}", columns=columns, data=rows, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_metrics": self.last_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
