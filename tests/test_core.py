"""The bottom layer every method builds on: the probe helper (core/probe.py), the model-to-method protocol
(core/protocol.py), typed results (core/results.py) and the distributed agreement (core/distributed.py)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from core import distributed as D
from core import probe
from core.errors import CapabilityError, ConfigError
from core.protocol import (CapsuleModel, FilterTemplateModel, Interpretable, PrototypeModel, RoutedUnitHead, UnitHead,
                           capabilities)
from core.results import Result, SchemaError, load_result


class Counting(nn.Module):
    """Wraps a module and counts its forward calls (to see where a forward pass stopped)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class ThreeStages(nn.Module):
    """A plain nn.Module that implements Interpretable without any project base class."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.s1 = Counting(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
        self.s2 = Counting(nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=True)))
        self.s3 = Counting(nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.ReLU()))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.s3(self.s2(self.s1(x))).mean((2, 3)))

    def probe_layers(self):
        return OrderedDict([("s1", self.s1), ("s2", self.s2), ("s3", self.s3)])

    def class_scores(self, x):
        return self(x)


def total_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_reads_several_layers_in_one_pass_and_stops_after_the_deepest():
    model, x = ThreeStages(), torch.randn(2, 3, 8, 8)
    out = probe.capture(model, ["s2", "s1"], x)
    assert list(out.acts) == ["s2", "s1"] and out.scores is None
    # s3 and the head never ran: the pass stopped once s2 (the deeper of the two) was captured
    assert (model.s1.calls, model.s2.calls, model.s3.calls) == (1, 1, 0)
    ref1 = model.s1.inner(x)
    assert torch.equal(out.acts["s1"], ref1) and torch.equal(out.acts["s2"], model.s2.inner(ref1))
    both = probe.capture(model, "s3", x, scores=True)
    assert torch.allclose(both.scores, model(x)) and total_hooks(model) == 0


def test_pre_relu_is_the_input_of_the_layers_last_relu_even_when_it_is_inplace():
    model, x = ThreeStages(), torch.randn(2, 3, 8, 8)
    out = probe.capture(model, ["s2:pre_relu", "s2"], x)
    conv = model.s2.inner[0](model.s1.inner(x))
    assert torch.allclose(out.acts["s2:pre_relu"], conv)          # negative values survive the inplace ReLU
    assert (out.acts["s2:pre_relu"] < 0).any() and torch.allclose(out.acts["s2"], conv.clamp_min(0))
    assert "s2:pre_relu" in probe.valid_names(model) and "s1:pre_relu" in probe.valid_names(model)


def test_leaf_capture_gives_the_full_gradient_from_a_graph_above_the_layer_only():
    model, x = ThreeStages(), torch.randn(2, 3, 8, 8)
    out = probe.capture(model, "s2", x, leaf=True)
    a = out.acts["s2"]
    assert a.is_leaf and a.requires_grad and out.scores.requires_grad
    (g,) = torch.autograd.grad(out.scores[:, 1].sum(), a)
    # the same gradient through the whole network
    full = model.s2.inner(model.s1.inner(x)).detach().requires_grad_(True)
    ref = model.head(model.s3(full).mean((2, 3)))
    (g_ref,) = torch.autograd.grad(ref[:, 1].sum(), full)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_names_resolve_with_errors_that_list_the_valid_ones_and_the_default_is_the_last_layer():
    model = ThreeStages()
    assert probe.default_layer(model) == "s3"
    model.default_probe_layer = "s2"
    assert probe.default_layer(model) == "s2" and probe.resolve_one(model).module is model.s2
    with pytest.raises(ConfigError, match=r"callbacks\.x\.layer: 'nope' is not a probe layer .*valid: s1, s1:pre_relu"):
        probe.resolve(model, ["nope"], option="callbacks.x.layer")
    with pytest.raises(CapabilityError, match="probe_layers"):
        probe.resolve(nn.Linear(2, 2), None)
    # a module given directly resolves to its probe-layer name
    assert list(probe.resolve(model, model.s1)) == ["s1"]


def test_hooks_are_removed_and_modes_restored_when_the_forward_pass_raises():
    class Boom(ThreeStages):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Boom()
    model.train()
    model.s1.inner[0].weight.grad = torch.ones_like(model.s1.inner[0].weight)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with probe.interpretation_mode(model):
            assert not model.training and torch.is_grad_enabled()
            torch.rand(3)  # draws from the stream that must be restored
            probe.capture(model, "s2", torch.randn(1, 3, 8, 8), scores=True)
    assert total_hooks(model) == 0 and model.training and model.s1.training
    assert torch.equal(model.s1.inner[0].weight.grad, torch.ones_like(model.s1.inner[0].weight))
    assert torch.equal(torch.get_rng_state(), before)


def test_interpretation_mode_leaves_inference_mode_and_enables_grad():
    model = ThreeStages()
    with torch.inference_mode():
        with probe.interpretation_mode(model):
            x = torch.randn(1, 3, 8, 8, requires_grad=True)
            (g,) = torch.autograd.grad(model(x).sum(), x)
            assert g.abs().sum() > 0
        with probe.interpretation_mode(model, grad=False):
            assert not torch.is_grad_enabled()


def test_built_in_models_offer_exactly_their_capabilities():
    from models.capsnet import CapsNet
    from models.cnn import CNNClassifier
    from models.dynconn import DynConnClassifier
    from models.icnn import ICNNClassifier
    from models.protopnet import ProtoPNet
    kw = dict(num_classes=3, channels=3, image_size=32)
    cases = {
        CNNClassifier(**kw): {"Interpretable", "UnitHead"},
        DynConnClassifier(k=2, **kw): {"Interpretable", "UnitHead", "RoutedUnitHead"},
        ICNNClassifier(**kw): {"Interpretable", "UnitHead", "FilterTemplateModel"},
        ProtoPNet(prototypes_per_class=2, prototype_dim=8, **kw): {"Interpretable", "UnitHead", "PrototypeModel"},
        CapsNet(num_classes=3, channels=1, image_size=28, conv_channels=16, primary_types=4): {"Interpretable",
                                                                                               "CapsuleModel"},
        ThreeStages(): {"Interpretable"},
    }
    for model, expected in cases.items():
        assert set(capabilities(model)) == expected, type(model).__name__
    # the unit layer of each UnitHead is one of its probe layers with as many channels as it has units
    for model in cases:
        if isinstance(model, UnitHead):
            acts, w = model.unit_contributions(torch.randn(2, 3, 32, 32))
            maps = probe.capture(model, model.unit_layer, torch.randn(2, 3, 32, 32)).acts[model.unit_layer]
            assert maps.shape[1] == acts.shape[1] == w.shape[1], type(model).__name__
    assert not isinstance(nn.Linear(2, 2), Interpretable)
    assert RoutedUnitHead and PrototypeModel and CapsuleModel and FilterTemplateModel


class Dynamic:
    """Members that exist only through __getattr__, as nn.Module keeps parameters, buffers and submodules."""

    def __getattr__(self, name):
        if name in ("unit_layer", "unit_contributions"):
            return "x"
        raise AttributeError(name)


def test_capabilities_see_members_that_only_getattr_provides():
    # Python 3.12's runtime-checkable protocols look members up statically and would miss these
    assert isinstance(Dynamic(), UnitHead) and not isinstance(Dynamic(), RoutedUnitHead)


@dataclass
class Toy(Result):
    schema = "test-toy"
    schema_version = 2
    values: list

    def payload(self):
        return {"values": self.values}

    @classmethod
    def from_payload(cls, data, version):
        return cls(values=list(data["values"]) if version >= 2 else [data["value"]])


def test_typed_results_round_trip_check_their_schema_and_read_older_versions(tmp_path):
    path = Toy([1.5, None]).save(tmp_path / "toy.json")
    assert Toy.load(path) == Toy([1.5, None]) and load_result(path) == Toy([1.5, None])
    assert Toy.from_json({"schema": "test-toy", "schema_version": 1, "value": 3}) == Toy([3])
    with pytest.raises(SchemaError, match="version 3"):
        Toy.from_json({"schema": "test-toy", "schema_version": 3, "values": []})
    with pytest.raises(SchemaError, match="not 'test-toy'"):
        Toy.from_json({"schema": "other", "values": []})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SchemaError, match="unreadable"):
        Toy.load(tmp_path / "bad.json")
    # NaN is not JSON: written as null
    assert Toy.load(Toy([float("nan")]).save(tmp_path / "nan.json")) == Toy([None])


def _agree(rank, world_size, _unused):
    out = {"any": D.agree_any(rank == 1)}
    try:
        D.raise_together(ValueError("bad shard") if rank == 1 else None)
    except ValueError as err:
        out["raised"] = f"own: {err}"
    except D.PeerFailure:
        out["raised"] = "peer"
    out["shard"] = D.shard_indices(5)
    return out


@pytest.mark.ddp
def test_ranks_agree_and_fail_together():
    from tests.ddp_utils import run_ddp
    r0, r1 = run_ddp(_agree, world_size=2, args=("",))
    assert r0["any"] and r1["any"]
    assert r0["raised"] == "peer" and r1["raised"] == "own: bad shard"
    assert r0["shard"] + r1["shard"] == [0, 1, 2, 3, 4]
