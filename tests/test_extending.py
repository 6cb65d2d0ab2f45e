"""A researcher's own model gets every generic method through train.py with no edits to callbacks/ (docs/extending.md):
a ClassifierModule subclass defined here that names no default probe layer, and a plain LightningModule that only
implements the protocol of core/protocol.py."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn

from models.base import ClassifierModule

SMALL = ["datamodule.n_train=480", "datamodule.n_val=120", "datamodule.n_test=120", "datamodule.batch_size=60"]
# the generic callbacks after every epoch, on small probe sets
EVERY_EPOCH = ["callbacks.dissection.every_n_epochs=1", "callbacks.dissection.probe_size=60",
               "callbacks.composability.every_n_epochs=1", "callbacks.attribution.every_n_epochs=1",
               "callbacks.attribution.max_images=24", "callbacks.featviz.every_n_epochs=1", "callbacks.featviz.steps=4",
               "callbacks.featviz.num_units=4", "callbacks.featviz.max_images=24",
               "callbacks.decision_tree.every_n_epochs=1"]
EXPECTED = ["interp/dissection/interpretable_units", "interp/composability/completeness",
            "interp/attribution/gradcam/pointing_game", "interp/featviz/activation_gain_median",
            "interp/decision_tree/explained_d1"]


def stages(channels: int) -> "OrderedDict[str, nn.Module]":
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
    return OrderedDict([("stage1", block(channels, 16)), ("stage2", block(16, 32)), ("stage3", block(32, 32))])


class TinyNet(ClassifierModule):
    """Three conv stages + GAP + linear head; probe_layers() but no default_probe_layer (the last stage is used)."""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 64, optimizer=None, scheduler=None,
                 **unused):
        super().__init__(num_classes=num_classes, channels=channels, image_size=image_size, optimizer=optimizer,
                         scheduler=scheduler)
        self.body = nn.Sequential(stages(channels))
        self.head = nn.Linear(32, num_classes)

    def probe_layers(self):
        return OrderedDict(self.body.named_children())

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))

    # UnitHead: the decision is a sum over the pooled channels of the last stage
    unit_layer = "stage3"

    def unit_contributions(self, x):
        return self.body(x).mean((2, 3)), self.head.weight


class PlainNet(LightningModule):
    """Not a ClassifierModule: its own steps and optimiser, plus the protocol (probe_layers, class_scores, and the
    UnitHead capability)."""

    unit_layer = "stage3"

    def __init__(self, num_classes: int, channels: int = 3, lr: float = 0.003, **unused):
        super().__init__()
        self.body = nn.Sequential(stages(channels))
        self.head = nn.Linear(32, num_classes)
        self.lr = lr

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))

    # ----- the protocol -----
    def probe_layers(self):
        return OrderedDict(self.body.named_children())

    def class_scores(self, x):
        return self(x)

    def unit_contributions(self, x):
        return self.body(x).mean((2, 3)), self.head.weight

    # ----- training -----
    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def _eval(self, batch, stage):
        x, y = batch[0], batch[1]
        self.log(f"{stage}/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["TinyNet", "PlainNet"])
def test_an_outside_model_gets_dissection_composability_attribution_and_featviz(run_train, tmp_path, target):
    run = tmp_path / "run"
    metrics = run_train(["model=cnn", f"model._target_=tests.test_extending.{target}", *SMALL, *EVERY_EPOCH,
                         "logger=csv", "trainer.max_epochs=2"], run)
    payload = json.loads((run / "metrics.json").read_text())
    assert payload["status"] == "completed" and payload["interp_errors"] == [], payload.get("interp_errors")
    assert metrics["test/acc"] > 1 / 12
    for key in EXPECTED:
        assert key in metrics, (key, sorted(k for k in metrics if k.startswith("interp/")))
    # every callback ran after every epoch and wrote its files into the run folder
    assert payload["interp_runs"] == {"dissection": 2, "composability": 2, "attribution": 2, "featviz": 2,
                                      "decision_tree": 2}
    for name in ("dissection", "composability", "attribution", "featviz", "decision_tree"):
        assert sorted(p.name for p in (run / "interp" / name).iterdir()) == ["epoch_000", "epoch_001"], name
    # the default layer of a model that names none is its last probe layer
    dissection = json.loads((run / "interp" / "dissection" / "epoch_001" / "dissection.json").read_text())
    assert "stage3" in json.dumps(dissection)


def doc_modules() -> dict[str, str]:
    """The code blocks of docs/extending.md that start with a '# <package>/<module>.py' line, by module name."""
    import re
    from tests.conftest import ROOT
    text = (ROOT / "docs" / "extending.md").read_text()
    out = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first = block.splitlines()[0]
        m = re.fullmatch(r"# (\w+)/(\w+)\.py", first.strip())
        if m:
            out[f"{m.group(1)}.{m.group(2)}"] = block
    return out


@pytest.mark.slow
def test_the_worked_method_of_docs_extending_runs_in_a_training_run(run_train, tmp_path, monkeypatch):
    import sys
    import types
    modules = doc_modules()
    assert set(modules) == {"algorithms.mean_activation", "callbacks.mean_activation"}
    for name in ("algorithms.mean_activation", "callbacks.mean_activation"):  # the algorithm first
        module = types.ModuleType(name)
        module.__file__ = f"<docs/extending.md:{name}>"
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(modules[name], module.__file__, "exec"), module.__dict__)
    run = tmp_path / "run"
    metrics = run_train(["model=cnn", *SMALL, "callbacks=minimal", "callbacks.interpretation=true", "logger=csv",
                         "trainer.max_epochs=1",
                         "+callbacks.mean_activation._target_=callbacks.mean_activation.MeanActivationCallback"], run)
    from algorithms.mean_activation import MeanActivationResult
    result = MeanActivationResult.load(run / "interp" / "mean_activation" / "epoch_000" / "mean_activation.json")
    assert result.layer == "backbone.conv4" and len(result.means) == 128
    assert metrics["interp/mean_activation/max_mean"] == pytest.approx(max(result.means))
    assert min(result.means) >= 0  # after a ReLU
