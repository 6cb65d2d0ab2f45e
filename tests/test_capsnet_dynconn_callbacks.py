"""The capsule and Dynamic-K callbacks inside a real Lightning fit on a tiny synthetic datamodule: files in the run
folder, metrics logged under interp/<name>/, applies only to its model."""
from __future__ import annotations


import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from algorithms.capsules import PERTURBATIONS, CapsulesResult
from algorithms.dynk_stats import DynKStats
from callbacks.capsules import CapsulesCallback
from callbacks.dynconn_stats import DynConnStatsCallback
from models.capsnet import CapsNet
from models.cnn import CNNClassifier
from models.dynconn import DynConnClassifier


class TinyData(pl.LightningDataModule):
    """Class c = a bright square at one of `num_classes` positions; the datamodule interface the callbacks use."""

    def __init__(self, channels=1, image_size=28, num_classes=3, n=48):
        super().__init__()
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.class_names = [f"class{c}" for c in range(num_classes)]
        self.mean, self.std = [0.1] * channels, [0.3] * channels
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(n) % num_classes
        raw = 0.1 * torch.rand(n, channels, image_size, image_size, generator=g)
        for i, c in enumerate(labels.tolist()):
            o = 3 + 6 * c
            raw[i, :, o:o + 6, o:o + 6] = 1.0
        self.raw, self.labels = raw, labels

    def normalize(self, x01):
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x01 - m.to(x01)) / s.to(x01)

    def vis_dataset(self, split="val"):
        return TensorDataset(self.raw, self.labels)

    def _loader(self):
        return DataLoader(TensorDataset(self.normalize(self.raw), self.labels), batch_size=16)

    train_dataloader = val_dataloader = test_dataloader = _loader


def fit(model, dm, callbacks, tmp_path):
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_capsules_callback_writes_grids_heatmap_json(tmp_path):
    torch.manual_seed(0)
    model = CapsNet(num_classes=3, channels=1, image_size=28, conv_channels=16, primary_types=4)
    cb = CapsulesCallback(num_images=2)
    dyn = DynConnStatsCallback()
    trainer = fit(model, TinyData(), [cb, dyn], tmp_path)
    out = tmp_path / "interp" / "capsules" / "epoch_000"
    assert (out / "perturbation_00.png").stat().st_size > 0 and (out / "perturbation_01.png").is_file()
    assert (out / "coupling_heatmap.png").stat().st_size > 0
    data = CapsulesResult.load(out / "capsules.json")
    assert data.perturbations == list(PERTURBATIONS) and len(data.images) == 2
    grid = torch.tensor(data.images[0]["coupling_to_prediction_grid"])
    assert grid.shape == (6, 6) and bool(((grid > 0) & (grid < 1)).all())
    assert "interp/capsules/reconstruction_sse" in trainer.callback_metrics
    # couplings of a child sum to 1 over 3 parents, so the mean coupling to any one parent is 1/3 on average
    assert 0.0 < float(trainer.callback_metrics["interp/capsules/coupling_to_prediction_mean"]) < 1.0
    assert not (tmp_path / "interp" / "dynconn").exists()  # the Dynamic-K callback does not apply to CapsNet


def test_dynconn_callback_logs_sparsity_every_epoch(tmp_path):
    torch.manual_seed(0)
    model = DynConnClassifier(num_classes=3, k=4, channels=3, image_size=32, widths=[8, 8, 16, 24])
    trainer = fit(model, TinyData(channels=3, image_size=32), [DynConnStatsCallback(), CapsulesCallback()],
                  tmp_path)
    m = trainer.callback_metrics
    assert 1.0 <= float(m["interp/dynconn/units_for_90pct"]) <= 4.0  # at most the K routed units carry evidence
    assert 0 < float(m["interp/dynconn/nonzero_weights_per_class"]) <= 24
    data = DynKStats.load(tmp_path / "interp" / "dynconn" / "epoch_000" / "dynconn.json")
    assert data.k == 4 and len(data.per_class) == 3 and len(data.examples) == 8
    ex = data.examples[0]
    assert sum(ex["contributions"]) == __import__("pytest").approx(ex["evidence"], abs=1e-5)
    assert not (tmp_path / "interp" / "capsules").exists()
    assert not DynConnStatsCallback().applies_to(CNNClassifier(num_classes=3, channels=3, image_size=32))
