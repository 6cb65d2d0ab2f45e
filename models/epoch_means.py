"""Epoch means of per-batch scalars, accumulated on the device in one tensor operation per batch.

`LightningModule.log(..., on_step=False, on_epoch=True)` costs about 0.3 ms of Python per call and per batch (its
result collection moves and re-checks every logged value each time), and ProtoPNet's loss has five terms: five calls
per batch for values nobody reads before the epoch ends. The module adds them here and logs each mean once, in
`on_train_epoch_end`. The arithmetic is Lightning's for a mean-reduced value (value * batch_size summed in float32,
divided by the summed batch sizes), so the logged numbers are the ones per-batch `self.log` calls produced.
"""
from __future__ import annotations

import torch


class EpochMeans:
    """Batch-size-weighted means of named scalars over the batches added since the last `pop()`."""

    def __init__(self):
        self.names: tuple[str, ...] = ()
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        if not values:
            return
        names = tuple(values)
        if self.sums is not None and names != self.names:
            raise ValueError(f"epoch means: the terms changed within an epoch ({self.names} -> {names})")
        # float32 as Lightning's accumulation: its default dtype, whatever the loss terms' precision
        stacked = torch.stack([v.detach().to(torch.float32) for v in values.values()]) * batch_size
        self.sums = stacked if self.sums is None else self.sums + stacked
        self.names, self.count = names, self.count + int(batch_size)

    def pop(self) -> dict[str, torch.Tensor]:
        """The means (one 0-d tensor per name; {} when nothing was added), and a fresh start."""
        if self.sums is None or self.count == 0:
            return {}
        means = self.sums / torch.tensor(self.count, device=self.sums.device)
        out = dict(zip(self.names, means.unbind()))
        self.__init__()
        return out
