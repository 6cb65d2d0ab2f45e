"""What every classifier of the project shares: metrics, metric names, optimiser wiring, the non-finite-loss guard,
and the `Interpretable` part of the model-to-method protocol (core/protocol.py: `probe_layers`, `class_scores`,
`default_probe_layer`). Optional capabilities (a sum-over-units head, prototypes, capsules, filter templates) are
implemented by the models that have them, never here, so `isinstance(model, UnitHead)` is true only for those."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from core import distributed as D
from core import probe
from core.errors import ConfigError
from models.epoch_means import EpochMeans


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN/inf; the last good checkpoint on disk is kept untouched."""


class ClassifierModule(LightningModule):
    """Base LightningModule of every classifier.

    Subclasses build the network in __init__ and implement `forward(x) -> logits`. They may override
    `compute_loss(outputs, y, stage)` (extra loss terms, logged as `{stage}/<name>`), `parameter_groups()` and
    `probe_layers()`.
    """

    #: name of the layer interpretation methods probe when none is configured ("" = the last probe layer)
    default_probe_layer: str = ""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 64,
                 optimizer: Callable | None = None, scheduler: Callable | None = None,
                 scheduler_interval: str = "epoch"):
        super().__init__()
        if int(num_classes) < 2:
            raise ConfigError(f"model.num_classes={num_classes}: a classifier needs at least 2 classes")
        self.num_classes, self.channels, self.image_size = int(num_classes), int(channels), int(image_size)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.train_terms = EpochMeans()

    # ----- the protocol (core/protocol.py) ------------------------------------------------------------------
    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        """Layers interpretation methods may hook, by name, in forward order (default: the backbone's stages)."""
        backbone = getattr(self, "backbone", None)
        return OrderedDict(backbone.probe_layers) if backbone is not None else OrderedDict()

    def get_probe_layer(self, name: str | None = None) -> nn.Module:
        """The module of a probe layer (None: the default one); an unknown name lists the valid ones."""
        return probe.resolve_one(self, name).module

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The per-class scores that decisions and attributions are about (logits; capsule lengths for CapsNet)."""
        return self(x)

    # ----- training ---------------------------------------------------------------------------------------------
    def compute_loss(self, outputs: Any, y: torch.Tensor, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(outputs, y), {}

    def logits_from_outputs(self, outputs: Any) -> torch.Tensor:
        return outputs

    def model_step(self, batch, stage: str):
        x, y = batch[0], batch[1]
        outputs = self(x)
        loss, terms = self.compute_loss(outputs, y, stage)
        return loss, terms, self.logits_from_outputs(outputs), y

    def training_step(self, batch, batch_idx):
        loss, terms, logits, y = self.model_step(batch, "train")
        self.check_finite(loss)
        # per batch only what is shown per batch (the loss); train/acc and the loss terms are epoch values, so the
        # batch adds to them without a `self.log` call each (~0.3 ms of Python per call; models/epoch_means.py) and
        # train/acc without computing a batch accuracy nobody reads (update, not forward)
        self.train_acc.update(logits.detach(), y)
        self.train_terms.add(terms, batch_size=len(y))
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # the same names, values and epoch-end rows as per-batch `self.log(..., on_epoch=True)` calls gave (and, as
        # then, no train/acc after an epoch without a training batch)
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in self.train_terms.pop().items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_acc)

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy):
        loss, terms, logits, y = self.model_step(batch, stage)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def check_finite(self, loss: torch.Tensor) -> None:
        # every rank must stop together, or the healthy ranks would wait forever in the next all-reduce
        bad = D.agree_any(not bool(torch.isfinite(loss.detach()).all()), device=loss.device)
        if bad:
            raise NonFiniteLossError(
                f"train/loss became non-finite ({loss.item()}) at epoch {self.current_epoch}, step "
                f"{self.global_step}; training stopped and the last good checkpoint "
                f"(checkpoints/last.ckpt) is kept. Lower the learning rate (model.optimizer.lr) or check the data.")

    # ----- optimisation ---------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict] | Any:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": "val/loss"}}
