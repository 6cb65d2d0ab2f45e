"""Concept composability and Interpretable Basis Decomposition against hand-computed values on hand-built models."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks.composability import (UNINTERPRETABLE, ComposabilityCallback, class_composition, compose,
                                     units_for_share)
from callbacks.dissection import DissectionCallback, DissectionResult
from callbacks.ibd import decompose
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
    """Units = the input vector; class scores = W x. Class 0 uses circle + red; class 1 uses circle (a little),
    square and an uninterpretable unit: evidence on class-1 images [0.5, 1, 0, 0, 1]."""

    def __init__(self, k=None):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, 0, 1, 0, 0], [0.5, 1, 0, 0, 1]]))
        if k is not None:
            self.k = k

    def forward(self, x):
        return x @ self.weight.t()

    def class_scores(self, x):
        return self(x)

    def unit_contributions(self, x):
        return x, self.weight


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


def test_dynamic_k_routing_fallback_gives_completeness():
    res = compose(HandModel(k=2), DataLoader(Vectors(), batch_size=6), labelled(UNITS), ibd_terms=0)
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


def test_callback_reuses_the_dissection_of_the_run(tmp_path, monkeypatch):
    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=12, size=16))
    dm.class_names = ["a", "b", "c"]
    dcb = DissectionCallback(probe_size=12, gallery_units=0)
    ccb = ComposabilityCallback(probe_size=12)
    trainer = fake_trainer(tmp_path, dm)
    trainer.callbacks = [dcb, ccb]
    model.train()
    dcb.execute(trainer, model)
    import callbacks.composability as C
    monkeypatch.setattr(C, "dissect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("dissected again")))
    metrics = ccb.execute(trainer, model)
    assert model.training and all_hooks(model) == 0
    for key in ("completeness", "concept_coverage", "sparsity_units90", "ibd_residual"):
        assert f"interp/composability/{key}" in metrics
    assert metrics["interp/composability/completeness"] <= 1.0 + 1e-9
    out = tmp_path / "interp" / "composability" / "epoch_000"
    assert (out / "composability.json").is_file() and (out / "composability.csv").is_file()
    # without the dissection callback it dissects by itself
    monkeypatch.undo()
    trainer.callbacks = [ccb]
    assert ccb.execute(trainer, model)["interp/composability/completeness"] == pytest.approx(
        metrics["interp/composability/completeness"])


def test_applies_only_to_models_with_unit_contributions():
    from models.base import ClassifierModule

    class NoUnits(ClassifierModule):
        def forward(self, x):
            return x
    assert ComposabilityCallback().applies_to(small_cnn())
    assert not ComposabilityCallback().applies_to(NoUnits(num_classes=2))


def test_unit_count_mismatch_is_skipped_with_a_warning(tmp_path, caplog):
    model = small_cnn()
    dm = ToyDataModule(ToyProbe(n=6, size=16))
    trainer = fake_trainer(tmp_path, dm)
    trainer.callbacks = []
    cb = ComposabilityCallback(layer="backbone.conv1", probe_size=6)   # 4 channels, but the head has 8 units
    with caplog.at_level("WARNING"):
        assert cb.execute(trainer, model) == {}
    assert "composability skipped" in caplog.text and "backbone.conv1" in caplog.text
