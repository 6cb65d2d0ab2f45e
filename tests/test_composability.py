"""Concept composability and Interpretable Basis Decomposition against hand-computed values on hand-built models."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from algorithms.composability import (UNINTERPRETABLE, CompositionResult, class_composition, compose,
                                      units_for_share)
from algorithms.dissection import DissectionResult
from algorithms.ibd import decompose
from callbacks.composability import ComposabilityCallback
from callbacks.dissection import DissectionCallback
from core.errors import ConfigError
from tests.test_dissection import ToyDataModule, ToyProbe, all_hooks, fake_trainer, small_cnn

NAMES = ["-", "circle", "square", "red", "green"]
CATS = ["", "object", "object", "color", "color"]
CLASS_CONCEPTS = {0: [1, 3], 1: [2, 4]}   # class 0 = red circle, class 1 = green square


def labelled(unit_concepts):
    """A DissectionResult whose unit u has IoU 0.5 with concept unit_concepts[u] (0 = none above 0.04)."""
    u = len(unit_concepts)
    inter = torch.zeros(u, len(NAMES), dtype=torch.float64)
    for j, c in enumerate(unit_concepts):
        if c:
            inter[j, c] = 20.0   # 20 / (30 + 30 - 20) = 0.5
    return DissectionResult(layer="toy", thresholds=torch.zeros(u), intersection=inter,
                            unit_area=torch.full((u,), 30.0, dtype=torch.float64),
                            concept_area=torch.full((len(NAMES),), 30.0, dtype=torch.float64), concept_names=NAMES,
                            concept_categories=CATS, category_names=["object", "color"], num_images=1,
                            map_size=(1, 1), seg_size=(1, 1), top_images=torch.zeros(u, 1, dtype=torch.long),
                            top_scores=torch.zeros(u, 1))


class HandModel(nn.Module):
    """Units = the input vector; class scores = W x (a core.protocol.UnitHead). Class 0 uses circle + red; class 1
    uses circle (a little), square and an uninterpretable unit: evidence on class-1 images [0.5, 1, 0, 0, 1]."""
    unit_layer = "toy"

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, 0, 1, 0, 0], [0.5, 1, 0, 0, 1]]))

    def forward(self, x):
        return x @ self.weight.t()

    def class_scores(self, x):
        return self(x)

    def unit_contributions(self, x):
        return x, self.weight


class RoutedHandModel(HandModel):
    """A core.protocol.RoutedUnitHead: only the K largest votes of each class count (Dynamic-K)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def routed_mask(self, units):
        votes = units[:, None, :] * self.weight[None]                              # [B, K, D]
        return torch.zeros_like(votes, dtype=torch.bool).scatter_(2, votes.topk(self.k, dim=2).indices, True)


class Vectors(Dataset):
    def __init__(self):
        self.x = torch.tensor([[1.0, 0, 1, 0, 0]] * 3 + [[1.0, 1, 0, 0, 1]] * 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


UNITS = [1, 2, 3, 4, 0]  # units 0-3 = circle, square, red, green; unit 4 uninterpretable


def test_hand_built_model_gives_the_expected_metrics():
    res = compose(HandModel(), DataLoader(Vectors(), batch_size=4), labelled(UNITS), class_names=["rc", "gs"],
                  class_concepts=CLASS_CONCEPTS, min_share=0.1, ibd_terms=0)
    m = res.metrics
    # class 0 decides on circle + red (precision 1, recall 1); class 1 on circle 20% + square 40% + uninterpretable
    # 40%: found {circle, square} vs truth {square, green} -> precision 1/2, recall 1/2
    assert m["agreement_precision"] == pytest.approx(0.75) and m["agreement_recall"] == pytest.approx(0.75)
    assert m["completeness"] == pytest.approx(1.0)               # a linear head routes everything, nothing cancels
    assert m["concept_coverage"] == pytest.approx((1.0 + 0.6) / 2)  # class-1 images: 1.5 of 2.5 is labelled
    assert m["sparsity_units90"] == pytest.approx((2 + 3) / 2)   # 90% of [1, 1] -> 2; of [1, 1, .5] -> 3 units
    assert m["nonzero_weights_per_class"] == pytest.approx(2.5)
    rc, gs = res.classes
    assert dict(rc.concept_shares) == pytest.approx({"circle": 0.5, "red": 0.5})
    assert dict(gs.concept_shares) == pytest.approx({"square": 0.4, UNINTERPRETABLE: 0.4, "circle": 0.2})
    assert gs.statement() == "gs = square 40% + (uninterpretable) 40% + circle 20%" or \
        gs.statement() == "gs = (uninterpretable) 40% + square 40% + circle 20%"
    assert (rc.precision, rc.recall, gs.precision, gs.recall) == (1.0, 1.0, 0.5, 0.5)


def test_dynamic_k_routing_gives_completeness():
    from core.protocol import RoutedUnitHead
    assert isinstance(RoutedHandModel(2), RoutedUnitHead) and not isinstance(HandModel(), RoutedUnitHead)
    res = compose(RoutedHandModel(k=2), DataLoader(Vectors(), batch_size=6), labelled(UNITS), ibd_terms=0)
    # class-1 images: top-2 votes [1, 1] of [0.5, 1, 0, 0, 1] -> completeness 2 / 2.5; class 0: 2 / 2
    assert res.metrics["completeness"] == pytest.approx((1.0 + 0.8) / 2)
    assert res.metrics["concept_coverage"] == pytest.approx((1.0 + 0.5) / 2)


def test_shares_sum_to_one_and_negative_share():
    ev = torch.tensor([3.0, -1.0, 1.0, 0.0, 2.0, -2.0])
    units = torch.tensor([1, 1, 2, 0, 0, 3])
    comp = class_composition(ev, units, NAMES, "x", 5)
    assert sum(comp.concept_shares.values()) == pytest.approx(1.0)
    assert dict(comp.concept_shares) == pytest.approx({"circle": 0.5, "square": 1 / 6, UNINTERPRETABLE: 1 / 3})
    assert comp.negative_share == pytest.approx(3 / 9)
    assert [u for u, _, _ in comp.top_units] == [0, 4, 2]


def test_units_for_share():
    ev = torch.tensor([[5.0, 3, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert units_for_share(ev, 0.9).tolist() == [3, 4, 0]


def test_ibd_recovers_a_known_combination_and_shares_plus_residual_is_one():
    q = torch.zeros(5, 4)
    q[1, 0] = q[2, 1] = q[3, 2] = 1.0
    q[4] = torch.tensor([0.6, 0.8, 0, 0])
    dec = decompose(torch.tensor([2.0, 0, 1, 0]), q)
    assert sorted(zip(dec.concepts, dec.coefficients)) == [(1, pytest.approx(2.0)), (3, pytest.approx(1.0))]
    assert dec.residual == pytest.approx(0.0, abs=1e-9)
    torch.manual_seed(0)
    qs = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    qs[0] = 0
    dec = decompose(torch.randn(16), qs, max_terms=4, min_gain=0.0)
    assert all(c > 0 for c in dec.coefficients) and 0 not in dec.concepts
    assert sum(dec.shares) + dec.residual_energy == pytest.approx(1.0, abs=1e-9)
    # negative coefficients are not allowed: w = -q1 decomposes into nothing
    assert decompose(-q[1], q).concepts == [] or all(c > 0 for c in decompose(-q[1], q).coefficients)


def test_composition_result_round_trips(tmp_path):
    dissection = labelled(UNITS)
    # concept c's vector = unit c - 1 (concept 0, unlabelled, has none)
    dissection.concept_feature_sum = torch.cat([torch.zeros(1, 5, dtype=torch.float64),
                                                torch.eye(5, dtype=torch.float64)[:4]])
    dissection.concept_weight = torch.ones(5, dtype=torch.float64)
    dissection.feature_sum = torch.zeros(5, dtype=torch.float64)
    dissection.num_locations = 1
    res = compose(HandModel(), DataLoader(Vectors(), batch_size=4), dissection, class_names=["rc", "gs"],
                  class_concepts=CLASS_CONCEPTS)
    res.epoch = 3
    assert res.ibd and res.ibd[0].concepts == ["circle", "red"] and res.classes[0].precision == 1.0
    again = CompositionResult.from_json(res.to_json())
    assert again == res
    assert [c.statement() for c in again.classes] == [c.statement() for c in res.classes]
    assert CompositionResult.load(res.save(tmp_path / "composability.json")) == res
    assert list(again.compositions().values())[0] == "circle 50% + red 50%"


def _callback_run(tmp_path, order, dissection_every=3, composability_every=3, epoch=0, max_epochs=1):
    """Both callbacks at the end of one epoch, in the given order of the callback list."""
    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=12, size=16))
    dm.class_names = ["a", "b", "c"]
    dcb = DissectionCallback(probe_size=12, gallery_units=0, every_n_epochs=dissection_every, on_error="raise")
    ccb = ComposabilityCallback(every_n_epochs=composability_every, on_error="raise")
    trainer = fake_trainer(tmp_path, dm, epoch=epoch, max_epochs=max_epochs)
    callbacks = {"dissection": dcb, "composability": ccb}
    trainer.callbacks = [callbacks[name] for name in order]
    model.train()
    for cb in trainer.callbacks:
        cb.setup(trainer, model, "fit")
    for cb in trainer.callbacks:
        cb.on_train_epoch_end(trainer, model)
    assert model.training and all_hooks(model) == 0
    return dcb, ccb


def test_either_callback_order_gives_the_same_result_from_one_dissection(tmp_path, monkeypatch):
    import callbacks.dissection as cd
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)
    real = cd.dissect
    monkeypatch.setattr(cd, "dissect", counted)
    outputs = {}
    for order in (("dissection", "composability"), ("composability", "dissection")):
        calls.clear()
        out = tmp_path / "-".join(order)
        dcb, ccb = _callback_run(out, order)
        assert calls == [["backbone.conv4"]], order   # one dissection computation for both callbacks
        metrics = ccb.last_metrics
        for key in ("completeness", "concept_coverage", "sparsity_units90", "ibd_residual"):
            assert f"interp/composability/{key}" in metrics
        assert metrics["interp/composability/completeness"] <= 1.0 + 1e-9
        epoch_dir = out / "interp" / "composability" / "epoch_000"
        assert (epoch_dir / "composability.csv").is_file()
        outputs[order] = (CompositionResult.load(epoch_dir / "composability.json"),
                          (out / "interp" / "dissection" / "epoch_000" / "dissection.json").read_text(),
                          ccb.last_metrics, dcb.last_metrics)
    a, b = outputs.values()
    assert a[0] == b[0] and a[0].layer == "backbone.conv4" and a[0].epoch == 0
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]


def test_the_provider_dissects_for_a_request_outside_its_own_schedule(tmp_path, monkeypatch):
    import callbacks.dissection as cd
    calls = []
    real = cd.dissect
    monkeypatch.setattr(cd, "dissect", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    dcb, ccb = _callback_run(tmp_path, ("dissection", "composability"), dissection_every=5,
                             composability_every=1, epoch=0, max_epochs=10)
    assert calls == [["backbone.conv4"]]
    assert not dcb.last_metrics and "interp/composability/completeness" in ccb.last_metrics
    assert not (tmp_path / "interp" / "dissection").exists()   # the provider computes; it writes only its own runs


def test_composability_needs_the_dissection_callback(tmp_path):
    trainer = fake_trainer(tmp_path, ToyDataModule(ToyProbe(n=4, size=16)))
    ccb = ComposabilityCallback()
    trainer.callbacks = [ccb]
    with pytest.raises(ConfigError, match="needs callbacks.dissection"):
        ccb.setup(trainer, small_cnn(), "fit")


def test_applies_only_to_models_with_unit_contributions():
    from models.base import ClassifierModule

    class NoUnits(ClassifierModule):
        def forward(self, x):
            return x
    assert ComposabilityCallback().applies_to(small_cnn())
    assert not ComposabilityCallback().applies_to(NoUnits(num_classes=2))


def test_unit_count_mismatch_fails_in_validate(tmp_path):
    model = small_cnn()
    trainer = fake_trainer(tmp_path, ToyDataModule(ToyProbe(n=6, size=16)))
    cb = ComposabilityCallback(layer="backbone.conv1")   # 4 channels, but the head has 8 units
    trainer.callbacks = [DissectionCallback(), cb]
    with pytest.raises(ConfigError, match=r"callbacks.composability.layer='backbone.conv1'.*8 units"):
        cb.setup(trainer, model, "fit")
    cb = ComposabilityCallback(layer="backbone.nope")
    trainer.callbacks = [DissectionCallback(), cb]
    with pytest.raises(ConfigError, match=r"callbacks.composability.layer: 'backbone.nope'.*backbone.conv4"):
        cb.setup(trainer, model, "fit")


@pytest.mark.parametrize("key,value", [("min_share", 0.0), ("min_share", 1.5), ("evidence_share", -0.1),
                                       ("ibd_terms", -1)])
def test_bad_settings_are_rejected(key, value):
    with pytest.raises(ConfigError, match=f"callbacks.composability.{key}"):
        ComposabilityCallback(**{key: value})


def test_without_a_probe_set_both_callbacks_switch_off(tmp_path, caplog):
    model = small_cnn()
    trainer = fake_trainer(tmp_path, ToyDataModule(None))
    dcb, ccb = DissectionCallback(), ComposabilityCallback()
    trainer.callbacks = [ccb, dcb]
    with caplog.at_level("WARNING"):
        for stage in ("fit", "test"):   # train.py tests after fitting: setup runs again, without a second warning
            for cb in trainer.callbacks:
                cb.setup(trainer, model, stage)
    assert not dcb.active and not ccb.active
    assert caplog.text.count("no concept probe set") == 1 and "callbacks.dissection.probe" in caplog.text
