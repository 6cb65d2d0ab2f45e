"""train/acc and the loss terms are epoch values accumulated without a `self.log` call per batch
(models/epoch_means.py): the logged numbers must equal those of per-batch `self.log(..., on_epoch=True)` calls, which
is what ClassifierModule did before, on a seeded two-epoch fit with a ragged last batch."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch import nn

from models.base import ClassifierModule
from models.epoch_means import EpochMeans


def test_epoch_means_weight_by_batch_size():
    means = EpochMeans()
    means.add({"a": torch.tensor(1.0), "b": torch.tensor(4.0)}, batch_size=3)
    means.add({"a": torch.tensor(2.0), "b": torch.tensor(-2.0)}, batch_size=1)
    out = means.pop()
    assert list(out) == ["a", "b"]
    assert out["a"].item() == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)
    assert out["b"].item() == pytest.approx((3 * 4.0 - 2.0) / 4)
    assert means.pop() == {}  # popped: the next epoch starts from nothing
    means.add({}, batch_size=5)  # a model without extra terms
    assert means.pop() == {}


def test_epoch_means_refuse_changing_terms():
    means = EpochMeans()
    means.add({"a": torch.tensor(1.0)}, batch_size=2)
    with pytest.raises(ValueError, match="terms changed"):
        means.add({"b": torch.tensor(1.0)}, batch_size=2)


class Tiny(ClassifierModule):
    """A linear classifier with two extra loss terms, like ProtoPNet's cluster/separation."""

    def __init__(self):
        super().__init__(num_classes=3, channels=1, image_size=4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(x.flatten(1))

    def compute_loss(self, outputs, y, stage):
        ce = F.cross_entropy(outputs, y)
        spread = outputs.std()
        return ce + 0.1 * spread, {"cross_entropy": ce.detach(), "spread": spread.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class PerBatchLogging(Tiny):
    """The per-batch logging ClassifierModule had before epoch_means: the reference."""

    def training_step(self, batch, batch_idx):
        loss, terms, logits, y = self.model_step(batch, "train")
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        pass


class Rows(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "rows", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def fit(cls) -> tuple[list, dict]:
    pl.seed_everything(3, verbose=False)
    x, y = torch.randn(70, 1, 4, 4), torch.randint(0, 3, (70,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))  # 16, 16, 16, 16, 6
    model, logger = cls(), Rows()
    trainer = pl.Trainer(max_epochs=2, logger=logger, log_every_n_steps=2, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)
    return logger.rows, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_epoch_values_equal_per_batch_logging():
    rows, final = fit(Tiny)
    ref_rows, ref_final = fit(PerBatchLogging)
    assert [step for step, _ in rows] == [step for step, _ in ref_rows]
    assert [sorted(r) for _, r in rows] == [sorted(r) for _, r in ref_rows]
    for (_, row), (_, ref) in zip(rows, ref_rows):
        assert row == ref  # exactly: the same float32 sums and divisions
    epoch_rows = [r for _, r in rows if "train/acc" in r]
    assert len(epoch_rows) == 2  # one per epoch, with every term
    assert all({"train/cross_entropy", "train/spread", "train/loss_epoch"} <= set(r) for r in epoch_rows)
    assert epoch_rows[0]["train/acc"] != epoch_rows[1]["train/acc"]  # reset between epochs (trained in between)
    assert final == ref_final


def test_no_train_acc_after_an_epoch_without_batches():
    model = Tiny()
    logged = []
    model.log = lambda name, *args, **kwargs: logged.append(name)
    model.on_train_epoch_end()
    assert logged == []  # as with per-batch logging: nothing was logged, so nothing at the epoch's end
    model.train_acc.update(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    model.train_terms.add({"spread": torch.tensor(1.0)}, batch_size=1)
    model.on_train_epoch_end()
    assert logged == ["train/acc", "train/spread"]
