"""The model-specific interpretation callbacks (prototypes, capsules, icnn metrics, Dynamic-K statistics): each applies
to a model iff the model offers its capability (also a model written outside the project), bad settings fail before
the first training step with the option's name, and their typed results read back equal."""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from algorithms.capsules import CapsulesResult, analyse_capsules
from algorithms.dynk_stats import DynKStats, evidence_sums, explain_decisions, head_parameters, predicted_evidence
from algorithms.icnn_metrics import ICNNMetricsResult, measure_filters
from algorithms.prototypes import PrototypeQuality, PrototypeRecords, push_statistics
from callbacks.capsules import CapsulesCallback
from callbacks.dynconn_stats import DynConnStatsCallback
from callbacks.icnn_metrics import ICNNMetricsCallback
from callbacks.prototypes import PrototypeCallback
from core.errors import ConfigError
from core.protocol import RoutedUnitHead, UnitHead
from core.results import load_result
from tests.test_capsnet_dynconn_callbacks import TinyData
from tests.test_icnn_metrics import FakeDataModule
from tests.test_icnn_metrics import _model as icnn_model

KW = dict(channels=3, image_size=32, widths=[8, 8, 16, 24])


class BatchRecorder(pl.Callback):
    """Counts the training batches that started (class attribute: also readable after train.py raised)."""
    batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        type(self).batches += 1


def fit(model, dm, callbacks, tmp_path, max_epochs=1):
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer


# ----- a model from outside the project: any LightningModule with the RoutedUnitHead members ------------------------
class TopTwoHead(pl.LightningModule):
    """Not a ClassifierModule: conv -> pooled units a [B, 6] -> per class only the 2 largest votes a_j W_cj count."""

    unit_layer = "conv"

    def __init__(self, num_classes=3, channels=3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(num_classes, 6))
        self.bias = nn.Parameter(torch.randn(num_classes))

    def probe_layers(self):
        return OrderedDict([("conv", self.conv)])

    def units(self, x):
        return self.conv(x).mean(dim=(2, 3))

    def unit_contributions(self, x):
        return self.units(x), self.weight

    def routed_mask(self, units):
        votes = units[:, None, :] * self.weight[None]
        return torch.zeros_like(votes, dtype=torch.bool).scatter_(2, votes.topk(2, dim=-1).indices, True)

    def class_scores(self, x):
        votes = self.units(x)[:, None, :] * self.weight[None]
        return votes.topk(2, dim=-1).values.sum(-1) + self.bias

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.class_scores(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DenseHead(TopTwoHead):
    """The same units with a dense head: a UnitHead, not routed."""
    routed_mask = None

    def class_scores(self, x):
        return self.units(x) @ self.weight.t() + self.bias


def test_dynamic_k_statistics_reach_a_model_from_outside_the_project(tmp_path):
    torch.manual_seed(0)
    model = TopTwoHead()
    assert isinstance(model, RoutedUnitHead)
    cb = DynConnStatsCallback(num_examples=3, on_error="raise")
    trainer = fit(model, TinyData(channels=3, image_size=32), [cb], tmp_path)
    assert cb.runs == 1 and not cb.errors
    assert 1.0 <= float(trainer.callback_metrics["interp/dynconn/units_for_90pct"]) <= 2.0
    stats = DynKStats.load(tmp_path / "interp" / "dynconn" / "epoch_000" / "dynconn.json")
    assert stats.k == 2 and len(stats.examples) == 3
    for ex in stats.examples:  # the routed evidence plus the bias is the class score
        assert len(ex["units"]) == 2
        assert ex["bias"] == pytest.approx(float(model.bias[ex["predicted"]].detach()), abs=1e-5)
        assert sum(ex["contributions"]) == pytest.approx(ex["score"] - ex["bias"], abs=1e-5)


def test_dense_unit_head_is_measured_with_the_same_ruler_but_gets_no_callback():
    torch.manual_seed(0)
    dense = DenseHead()
    assert isinstance(dense, UnitHead) and not isinstance(dense, RoutedUnitHead)
    assert not DynConnStatsCallback().applies_to(dense)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        evidence, pred, scores = predicted_evidence(dense, x)
        acts, w = dense.unit_contributions(x)
    torch.testing.assert_close(evidence, acts * w[pred])          # every unit counts
    torch.testing.assert_close(evidence.sum(1) + dense.bias[pred], scores[torch.arange(5), pred])
    assert all(len(e["units"]) == 5 for e in explain_decisions(dense, x))
    weight, bias = head_parameters(dense, x[0])
    torch.testing.assert_close(weight, dense.weight.detach())
    torch.testing.assert_close(bias, dense.bias.detach())
    sums = evidence_sums(dense, [x], bias)
    assert float(sums.count.sum()) == 5 and float(sums.routed_max) == 6
    # the decisions counted are the class scores' decisions
    assert sums.count.tolist() == torch.bincount(pred, minlength=3).double().tolist()


def test_each_callback_applies_exactly_to_the_models_with_its_capability():
    from models.capsnet import CapsNet
    from models.cnn import CNNClassifier
    from models.dynconn import DynConnClassifier
    from models.icnn import ICNNClassifier
    from models.protopnet import ProtoPNet
    models = {"protopnet": ProtoPNet(3, prototypes_per_class=1, prototype_dim=8, **KW),
              "capsnet": CapsNet(3, channels=1, image_size=28, conv_channels=8, primary_types=2),
              "dynconn": DynConnClassifier(3, k=2, **KW), "icnn": ICNNClassifier(3, filters=4, **KW),
              "icnn_baseline": ICNNClassifier(3, filters=4, interpretable=False, **KW),
              "cnn": CNNClassifier(3, **KW), "outside": TopTwoHead()}
    expected = {PrototypeCallback(): {"protopnet"}, CapsulesCallback(): {"capsnet"},
                DynConnStatsCallback(): {"dynconn", "outside"}, ICNNMetricsCallback(): {"icnn", "icnn_baseline"},
                # all_models: also any Interpretable model's probe layer
                ICNNMetricsCallback(all_models=True): set(models)}
    for cb, names in expected.items():
        assert {n for n, m in models.items() if cb.applies_to(m)} == names, type(cb).__name__
    assert "PrototypeModel" in PrototypeCallback().why_not(models["cnn"])


# ----- bad settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,option", [
    (lambda: DynConnStatsCallback(fraction=2), "callbacks.dynconn_stats.fraction"),
    (lambda: DynConnStatsCallback(fraction=0), "callbacks.dynconn_stats.fraction"),
    (lambda: DynConnStatsCallback(max_images=0), "callbacks.dynconn_stats.max_images"),
    (lambda: ICNNMetricsCallback(quantile=1.0), "callbacks.icnn_metrics.quantile"),
    (lambda: ICNNMetricsCallback(top_k=1), "callbacks.icnn_metrics.top_k"),
    (lambda: ICNNMetricsCallback(max_images=0), "callbacks.icnn_metrics.max_images"),
    (lambda: PrototypeCallback(purity_k=0), "callbacks.prototypes.purity_k"),
    (lambda: PrototypeCallback(num_explained=-1), "callbacks.prototypes.num_explained"),
    (lambda: PrototypeCallback(top_prototypes=0), "callbacks.prototypes.top_prototypes"),
    (lambda: PrototypeCallback(probe_limit=0), "callbacks.prototypes.probe_limit"),
    (lambda: CapsulesCallback(num_images=0), "callbacks.capsules.num_images"),
])
def test_values_wrong_for_any_model_are_rejected_when_the_callback_is_made(make, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        make()


class PartsData(pl.LightningDataModule):
    """FakeDataModule's probe set (part masks and landmarks) plus training data for a Trainer."""

    def __init__(self, with_parts=True):
        super().__init__()
        self.fake = FakeDataModule()
        self.with_parts = with_parts

    def probe_dataset(self, split="val"):
        return self.fake.ds if self.with_parts else None

    def train_dataloader(self):
        x = torch.stack([self.fake.ds[i]["image"] for i in range(8)])
        return DataLoader(TensorDataset(x, torch.arange(8) % 2), batch_size=4)


def test_unknown_icnn_layer_fails_before_the_first_training_step(tmp_path):
    BatchRecorder.batches = 0
    with pytest.raises(ConfigError, match=r"callbacks\.icnn_metrics\.layer: 'nope'.*icnn\.filters1"):
        fit(icnn_model(), PartsData(), [BatchRecorder(), ICNNMetricsCallback(layer="nope")], tmp_path)
    assert BatchRecorder.batches == 0


@pytest.mark.parametrize("data,callback,match", [
    ("no_vis", lambda: PrototypeCallback(), r"callbacks\.prototypes.*vis_dataset"),
    ("toy", lambda: PrototypeCallback(probe_split="nope"), r"callbacks\.prototypes\.probe_split='nope'"),
])
def test_prototype_settings_the_data_cannot_serve_fail_before_training(tmp_path, data, callback, match):
    from tests.test_protopnet_train import ToyData, toy_model

    class NoVis(ToyData):
        vis_dataset = None

    BatchRecorder.batches = 0
    with pytest.raises(ConfigError, match=match):
        fit(toy_model(), NoVis() if data == "no_vis" else ToyData(), [BatchRecorder(), callback()], tmp_path)
    assert BatchRecorder.batches == 0


def test_icnn_metrics_switch_off_with_one_warning_on_data_without_parts(tmp_path, caplog):
    cb = ICNNMetricsCallback(on_error="raise")
    with caplog.at_level(logging.WARNING, logger="callbacks.icnn_metrics"):
        fit(icnn_model(), PartsData(with_parts=False), [cb], tmp_path, max_epochs=2)
    assert cb.runs == 0 and not cb.active and not (tmp_path / "interp" / "icnn").exists()
    assert sum("part masks and landmarks" in r.getMessage() for r in caplog.records) == 1


def test_bad_icnn_layer_through_train_py_fails_before_training(run_train, tmp_path):
    BatchRecorder.batches = 0
    with pytest.raises(ConfigError, match=r"callbacks\.icnn_metrics\.layer"):
        run_train(["model=icnn", "logger=none", "callbacks.icnn_metrics.layer=nope", "datamodule.n_train=64",
                   "datamodule.n_val=32", "datamodule.n_test=32", "model.filters=8",
                   "+callbacks.batches._target_=tests.test_model_callbacks.BatchRecorder"], tmp_path / "run")
    assert BatchRecorder.batches == 0


def test_bad_dynconn_fraction_through_the_config_fails_before_training(run_train, tmp_path):
    with pytest.raises(Exception, match=r"callbacks\.dynconn_stats\.fraction=2"):
        run_train(["model=dynconn", "logger=none", "callbacks.dynconn_stats.fraction=2"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----- schedule ------------------------------------------------------------------------------------------------------
def test_prototypes_run_after_every_push_only():
    from tests.test_protopnet_train import toy_model
    model = toy_model()
    cb = PrototypeCallback(every_n_epochs=1)
    at = (lambda epoch: SimpleNamespace(lightning_module=model, current_epoch=epoch, max_epochs=10))
    assert not any(cb.should_run(at(e)) for e in range(10))          # no push yet
    model.push_history, model.last_push = [{"epoch": 2}], object()
    assert [e for e in range(10) if cb.should_run(at(e))] == [2]
    assert not cb.should_run(SimpleNamespace(lightning_module=TopTwoHead(), current_epoch=2, max_epochs=10))


# ----- typed results read back equal -------------------------------------------------------------------------------
def roundtrip(result, tmp_path):
    assert type(result).from_json(result.to_json()) == result
    path = result.save(tmp_path / f"{result.schema}.json")
    assert type(result).load(path) == result and load_result(path) == result
    return path


def test_prototype_results_round_trip(tmp_path):
    from tests.test_protopnet_train import ToyData, toy_model
    model, dm = toy_model().eval(), ToyData()
    push = model.push(dm.push_dataloader(32))
    stats = push_statistics(model, push)
    quality = PrototypeQuality.build(3, stats, {"purity": 0.5, "purity_per_category": {"color": float("nan")},
                                                "class_object_hit_rate": 0.75, "hit_rate_coverage": 1.0})
    roundtrip(quality, tmp_path)
    assert quality.metrics()["unique_source_fraction"] == stats["unique_sources"] / stats["pushed"]
    assert math.isnan(quality.metrics()["purity_color"])
    roundtrip(PrototypeQuality.build(0, stats), tmp_path)           # data without concept masks
    records = PrototypeRecords.build({**model.push_history[-1], "mean_distance": float("nan")}, push, dm.class_names)
    roundtrip(records, tmp_path)
    assert len(records.prototypes) == model.num_prototypes and records.prototypes[0]["class_name"] == "red"


def test_capsules_result_round_trips_and_matches_the_forward_pass(tmp_path):
    from models.capsnet import CapsNet
    torch.manual_seed(0)
    model = CapsNet(3, channels=1, image_size=28, conv_channels=8, primary_types=2).eval()
    x = torch.randn(2, 1, 28, 28)
    analysis = analyse_capsules(model, x)
    result = analysis.result([0, 2], epoch=1)
    assert isinstance(result, CapsulesResult)
    roundtrip(result, tmp_path)
    with torch.no_grad():
        out = model.capsules(x, reconstruct=True)
    assert result.images[1]["predicted"] == int(out.lengths[1].argmax()) and result.images[1]["label"] == 2
    assert result.metrics["reconstruction_sse"] == pytest.approx(
        float((out.reconstruction - out.target).pow(2).flatten(1).sum(1).mean()), rel=1e-6)


def test_dynk_stats_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TopTwoHead().eval()
    x = torch.rand(6, 3, 32, 32)
    sums = evidence_sums(model, [x[:4], x[4:]], head_parameters(model, x[0])[1])
    stats = DynKStats.build(2, sums, model.weight, 0.9, ["a", "b", "c"], explain_decisions(model, x[:2]))
    roundtrip(stats, tmp_path)
    assert stats.k == 2 and sum(r["predicted_images"] for r in stats.per_class) == 6
    assert 1.0 <= stats.metrics["units_for_90pct"] <= 2.0


def test_icnn_metrics_result_round_trips(tmp_path):
    model, dm = icnn_model(), FakeDataModule()
    measured = measure_filters(model, None, dm.ds, DataLoader(dm.ds, batch_size=8), top_k=5)
    result = ICNNMetricsResult.build(0, "icnn.filters1", measured, dm.ds.part_names,
                                     model.filter_class().tolist(), top_k=5)
    roundtrip(result, tmp_path)
    assert len(result.filters) == 6 and result.metrics == measured.metrics()


def _dynk_in_process(rank, world_size, root):
    torch.manual_seed(0)
    model = TopTwoHead().eval()
    dm = TinyData(channels=3, image_size=32, n=45)   # uneven shards: 23 + 22 images
    cb = DynConnStatsCallback(batch_size=8, num_examples=2, on_error="raise")
    trainer = SimpleNamespace(default_root_dir=root, datamodule=dm, loggers=[], global_step=0, current_epoch=0)
    return cb.run(trainer, model, 0)


@pytest.mark.ddp
def test_dynk_statistics_under_two_processes_equal_one_process(tmp_path):
    from tests.ddp_utils import run_ddp
    single = _dynk_in_process(0, 1, str(tmp_path / "single"))
    for r in run_ddp(_dynk_in_process, 2, args=(str(tmp_path / "ddp"),)):
        assert r.keys() == single.keys()
        for k in single:
            assert r[k] == pytest.approx(single[k], rel=1e-6), k
    assert DynKStats.load(tmp_path / "ddp" / "interp" / "dynconn" / "epoch_000" / "dynconn.json").k == 2
