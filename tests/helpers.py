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


class PauseOnce(Callback):
    """Holds training (rank 0) at the end of batch `batch` of epoch `epoch`, once per `marker` file: creates the marker
    (so a test knows where the run is) and waits until `seconds` pass or a SIGINT/SIGTERM is pending. A resumed run finds
    the marker and does not pause again. Draws no random numbers, so it never changes what the run computes."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 2, seconds: float = 300.0):
        self.marker, self.epoch, self.batch, self.seconds = marker, epoch, batch, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time
        from pathlib import Path

        from pipeline.interrupts import INTERRUPTS
        # rank 0 only: a paused rank 1 would hold rank 0 inside a collective, where Python runs no signal handler
        if (trainer.global_rank != 0 or trainer.current_epoch != self.epoch or batch_idx != self.batch
                or Path(self.marker).exists()):
            return
        Path(self.marker).write_text(f"{trainer.current_epoch} {batch_idx} {trainer.global_step}")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not INTERRUPTS.pending:
            time.sleep(0.05)


class SlowCheckpointWrite(Callback):
    """Makes the checkpoint write of the end of epoch `epoch` stop half-way: the temporary file gets its bytes, then
    the process waits (creating `marker`) to be killed, as a kill or power loss in the middle of a write would."""

    def __init__(self, marker: str, epoch: int = 1, seconds: float = 300.0):
        self.marker, self.epoch, self.seconds = marker, epoch, seconds

    def setup(self, trainer, pl_module, stage):
        import os
        import time
        from pathlib import Path

        original = torch.save
        helper = self

        def slow_save(obj, f, *args, **kwargs):
            original(obj, f, *args, **kwargs)
            if not hasattr(f, "fileno") or Path(helper.marker).exists():
                return
            # last.ckpt's temporary file (not the best checkpoint's), at the end of epoch `epoch`
            name = os.readlink(f"/proc/self/fd/{f.fileno()}")
            if Path(name).name.startswith(".last.ckpt.") and obj.get("epoch") == helper.epoch:
                f.flush()
                Path(helper.marker).write_text(name)
                time.sleep(helper.seconds)

        torch.save = slow_save
