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


from callbacks.base import InterpretationCallback  # noqa: E402


class FailingInterpretation(InterpretationCallback):
    """An interpretation callback that raises from epoch `fail_epoch` on (on rank `fail_rank` only, or on every rank
    when None); before that it logs interp/boom/ok = 1."""

    name = "boom"

    def __init__(self, fail_epoch: int = 1, fail_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fail_epoch, self.fail_rank = int(fail_epoch), fail_rank
        self.ran: list[int] = []

    def run(self, trainer, module, epoch):
        from core import distributed as D
        self.ran.append(epoch)
        if epoch >= self.fail_epoch and (self.fail_rank is None or D.rank() == self.fail_rank):
            raise RuntimeError(f"boom at epoch {epoch}")
        return {"ok": 1.0}
