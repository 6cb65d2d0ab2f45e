"""Callbacks used by tests through config overrides (`+callbacks.x._target_=tests.helpers.X`)."""
from __future__ import annotations

import torch
from pytorch_lightning import Callback


class PoisonWeights(Callback):
    """Fills the first parameter with NaN at the start of epoch `epoch`, so the next loss is NaN."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))
