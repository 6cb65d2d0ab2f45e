"""Dynamic-K head: equality with nn.Linear at K = D, gradients only through the routed top-K connections,
explanations that add up to the routed evidence, sparsity statistics by hand, bad K."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models.dynconn as dynconn
from models import dynk_kernel
from algorithms.dynk_stats import explain_decisions, predicted_evidence, units_for_evidence, weight_sparsity
from models.dynconn import DynamicKLinear, DynConnClassifier
from core.errors import ConfigError


def pair(D=12, C=5, k=None, seed=0):
    torch.manual_seed(seed)
    layer = DynamicKLinear(D, C, k or D)
    linear = nn.Linear(D, C)
    linear.load_state_dict({"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()})
    return layer, linear


def test_k_equal_d_is_nn_linear_values_and_gradients():
    layer, linear = pair()
    x = torch.relu(torch.randn(7, 12))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    z1, z2 = layer(x1), linear(x2)
    assert torch.equal(z1, z2)
    g = torch.randn_like(z1)
    z1.backward(g)
    z2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(layer.weight.grad, linear.weight.grad) and torch.equal(layer.bias.grad, linear.bias.grad)


def test_routed_path_with_all_connections_matches_linear():
    # the top-K machinery itself (not the K = D shortcut) reproduces the linear layer when every unit is routed
    layer, linear = pair()
    x = torch.relu(torch.randn(7, 12)).requires_grad_()
    votes, index = layer.routed(x)
    z = votes.sum(-1) + layer.bias
    torch.testing.assert_close(z, linear(x))
    gx, gw = torch.autograd.grad(z.sum(), (x, layer.weight))
    gx2, gw2 = torch.autograd.grad(linear(x).sum(), (x, linear.weight))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2)


def test_forward_is_sum_of_k_largest_votes_plus_bias():
    layer, _ = pair(D=20, C=6, k=3, seed=1)
    x = torch.relu(torch.randn(9, 20))
    votes = x[:, None, :] * layer.weight[None]
    expected = votes.sort(dim=-1, descending=True).values[..., :3].sum(-1) + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_gradients_reach_only_the_selected_connections():
    layer, _ = pair(D=16, C=4, k=3, seed=2)
    x = torch.relu(torch.randn(5, 16)) + 0.01  # strictly positive: every vote is non-zero
    top = (x[:, None, :] * layer.weight.detach()[None]).topk(3, dim=-1).indices      # [B, C, K]
    for b in range(5):
        xb = x[b:b + 1].clone().requires_grad_()
        layer.zero_grad()
        layer(xb).sum().backward()
        selected = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, top[b], True)
        # dz_c/dW_cj = x_j on the K routed connections of this sample and class, 0 on every other one
        torch.testing.assert_close(layer.weight.grad, torch.where(selected, x[b].expand(4, 16), 0.0))
        torch.testing.assert_close(xb.grad[0], (layer.weight.detach() * selected).sum(0))
    assert torch.equal(layer.routed_mask(x), torch.zeros(5, 4, 16, dtype=torch.bool).scatter_(2, top, True))


def test_selection_in_blocks_equals_one_block(monkeypatch):
    monkeypatch.setenv(dynk_kernel.ENV_SWITCH, "0")  # the torch selection (the CPU kernel has no blocks)
    layer, _ = pair(D=32, C=7, k=4, seed=3)
    x = torch.relu(torch.randn(33, 32))
    whole = layer.select(x).sort(-1).values
    monkeypatch.setattr(dynconn, "SELECTION_BLOCK", 7 * 32 * 2)  # two samples per block
    torch.testing.assert_close(layer.select(x).sort(-1).values, whole)


def brute_force_topk_values(layer, x):
    votes = x[:, None, :] * layer.weight.detach()
    return votes.topk(layer.k, dim=-1).values.sort(-1).values


@pytest.mark.parametrize("B,D,C,k", [(64, 512, 40, 5), (16, 300, 12, 30), (8, 70, 5, 1)])
def test_pruned_selection_equals_all_votes(B, D, C, k, monkeypatch):
    """The candidate-then-bound selection (non-negative features, D > 64) picks exactly the K largest votes: the
    same units as forming all B x C x D votes, also when most pairs need the fallback (tiny blocks force several).
    This is the torch path (GPU, other dtypes, no compiler); tests/test_dynk_kernel.py checks the CPU kernel."""
    monkeypatch.setenv(dynk_kernel.ENV_SWITCH, "0")
    torch.manual_seed(D)
    layer = dynconn.DynamicKLinear(D, C, k)
    x = torch.relu(torch.randn(B, D))
    x[0] = 0.0  # an all-zero sample: every vote ties at 0
    full = layer._select_all(x, layer.weight.detach()).sort(-1).values
    assert torch.equal(layer.select(x).sort(-1).values[1:], full[1:])
    values = (x[:, None, :] * layer.weight.detach()).gather(2, layer.select(x)).sort(-1).values
    assert torch.equal(values, brute_force_topk_values(layer, x))
    monkeypatch.setattr(dynconn, "SELECTION_BLOCK", D * 3)  # the undecided pairs in blocks of 3
    assert torch.equal(layer.select(x).sort(-1).values[1:], full[1:])


def test_pruned_selection_decides_most_pairs_and_falls_back_for_the_rest(monkeypatch):
    monkeypatch.setenv(dynk_kernel.ENV_SWITCH, "0")
    torch.manual_seed(0)
    layer = dynconn.DynamicKLinear(512, 50, 5)
    x = torch.relu(torch.randn(32, 512))
    calls = []
    original = dynconn.DynamicKLinear._select_all
    monkeypatch.setattr(dynconn.DynamicKLinear, "_select_all", lambda self, *a: calls.append(1) or original(self, *a))
    layer.select(x)
    assert not calls  # non-negative features and D > 64: the pruned path
    layer.select(x - 0.5)  # negative features: the bound does not hold, all votes are formed
    assert calls == [1]
    # constant features tie every candidate with the bound: every pair falls back, and the values stay exact
    ones = torch.ones(4, 512)
    values = (ones[:, None, :] * layer.weight.detach()).gather(2, layer.select(ones)).sort(-1).values
    assert torch.equal(values, brute_force_topk_values(layer, ones))


def test_explanation_shares_sum_to_routed_evidence():
    torch.manual_seed(4)
    model = DynConnClassifier(num_classes=6, k=4, channels=3, image_size=32, widths=[8, 8, 16, 24]).eval()
    x = torch.randn(5, 3, 32, 32)
    explanations = explain_decisions(model, x)
    with torch.no_grad():
        scores = model(x)
        mask = model.routed_mask(model.features(x))
        evidence = model.unit_evidence(x)
    for n, e in enumerate(explanations):
        c = e["predicted"]
        assert c == int(scores[n].argmax())
        assert len(e["units"]) == 4 and all(bool(mask[n, c, u]) for u in e["units"])
        assert sum(e["contributions"]) == pytest.approx(e["score"] - e["bias"], abs=1e-5)
        assert e["evidence"] == pytest.approx(float(evidence[n, c].sum()), abs=1e-6)
        total = sum(abs(v) for v in e["contributions"])
        assert sum(abs(s) for s in e["shares"]) == pytest.approx(1.0, abs=1e-6)
        assert sum(e["shares"]) == pytest.approx(sum(e["contributions"]) / total, abs=1e-6)
    # the evidence API agrees with the forward pass for every class, not just the predicted one
    torch.testing.assert_close(evidence.sum(-1) + model.head.bias, scores)
    ev, pred, _ = predicted_evidence(model, x)
    assert bool(((ev != 0).sum(1) <= 4).all())


def test_units_for_evidence_and_weight_sparsity_by_hand():
    evidence = torch.tensor([[5.0, 3.0, 1.0, 1.0], [0.0, -9.5, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # 90% of 10 = 9 -> 5 + 3 + 1; 90% of 10 = 9 -> |-9.5|; 90% of 4 = 3.6 -> 4 units
    assert units_for_evidence(evidence, 0.9).tolist() == [3, 1, 4]
    assert units_for_evidence(evidence, 0.5).tolist() == [1, 1, 2]
    w = torch.tensor([[1.0, 0.005, -0.5, 0.0], [0.2, 0.2, 0.0019, -0.2]])
    assert weight_sparsity(w).tolist() == [2, 3]


def test_dense_head_evidence_is_every_unit():
    torch.manual_seed(5)
    from models.cnn import CNNClassifier
    model = CNNClassifier(num_classes=3, channels=3, image_size=32, widths=[8, 8, 16, 24]).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ev, pred, scores = predicted_evidence(model, x)
        torch.testing.assert_close(scores, model(x))
    torch.testing.assert_close(ev.sum(1) + model.head.bias[pred], scores[torch.arange(4), pred])


@pytest.mark.parametrize("k", [0, -1, 129])
def test_bad_k_names_the_option(k):
    with pytest.raises(ConfigError, match=r"model\.k"):
        DynConnClassifier(num_classes=4, k=k, channels=3, image_size=32)  # small backbone: D = 128


def test_head_weight_decay_only_on_the_head_weights():
    from functools import partial
    model = DynConnClassifier(num_classes=4, k=2, channels=3, image_size=32, widths=[8, 8, 16, 24],
                              head_weight_decay=1e-4, optimizer=partial(torch.optim.Adam, lr=1e-3, weight_decay=0.0))
    opt = model.configure_optimizers()
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model.head.weight)] == 1e-4
    assert all(v == 0.0 for k, v in decay.items() if k != id(model.head.weight))
    assert len(decay) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match=r"model\.head_weight_decay"):
        DynConnClassifier(num_classes=4, k=2, channels=3, image_size=32, head_weight_decay=-1.0)
