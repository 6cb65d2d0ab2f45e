"""Decision sparsity of a routed unit head (Dynamic-K) every epoch on the validation set (algorithms/dynk_stats.py):
logs `interp/dynconn/{units_for_90pct, routed_share_top1, nonzero_weights_per_class, nonzero_weights_fraction}` and
writes <run>/interp/dynconn/epoch_NNN/dynconn.json (`DynKStats`: per class, example explanations)."""
from __future__ import annotations

import torch

from algorithms.dynk_stats import DynKStats, evidence_sums, explain_decisions, head_parameters
from callbacks.base import InterpretationCallback, check_fraction, check_int
from core import distributed as D
from core.errors import ConfigError
from core.probe import model_device
from core.protocol import RoutedUnitHead


class DynConnStatsCallback(InterpretationCallback):
    """Sparsity of the routed head's decisions on the validation set and of its weights, every epoch."""

    name = "dynconn"
    config_key = "dynconn_stats"
    requires = (RoutedUnitHead,)

    def __init__(self, fraction: float = 0.9, max_images: int = 512, num_examples: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.fraction = check_fraction(fraction, self.option("fraction"), inclusive_high=True)
        self.max_images = check_int(max_images, self.option("max_images"), 1)
        self.num_examples = check_int(num_examples, self.option("num_examples"), 0)

    def validate(self, trainer, module, datamodule) -> None:
        if datamodule is None or not callable(getattr(datamodule, "val_dataloader", None)):
            raise ConfigError(f"{self.option('')[:-1]} measures on the validation set: it needs the run's "
                              f"datamodule with val_dataloader() (trainer.fit(model, datamodule=...))")

    def run(self, trainer, module, epoch: int) -> dict[str, float]:
        dm = self.datamodule(trainer)
        ds = dm.val_dataloader().dataset
        subset = torch.utils.data.Subset(ds, range(min(len(ds), self.max_images)))
        dev = model_device(module)
        weight, bias = head_parameters(module, torch.as_tensor(ds[0][0]).to(dev))
        examples: list = []

        def batches():
            for batch in self.loader(self.shard(subset)):
                x = batch[0].to(dev)
                if self.is_rank_zero and len(examples) < self.num_examples:
                    examples.extend(explain_decisions(module, x[: self.num_examples - len(examples)]))
                yield x

        sums = evidence_sums(module, batches(), bias, self.fraction, dev)
        sums.units, sums.count, sums.top1 = (D.all_reduce_sum(t) for t in (sums.units, sums.count, sums.top1))
        sums.routed_max = D.all_reduce_max(sums.routed_max)
        stats = DynKStats.build(epoch, sums, weight, self.fraction, getattr(dm, "class_names", None), examples)
        if self.is_rank_zero:
            stats.save(self.epoch_dir(trainer, epoch) / "dynconn.json")
            pct = int(round(self.fraction * 100))
            self.log_table(trainer, "per_class", ["class", "nonzero_weights", f"units_for_{pct}pct", "images"],
                           [list(r.values()) for r in stats.per_class])
        return stats.metrics
