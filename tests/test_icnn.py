"""Interpretable CNN: templates, masks and filter loss against the paper's formulas (hand-written / brute force),
assignment, training, the baseline switch and bad configuration."""
from __future__ import annotations

import math

import pytest
import torch

from core.errors import ConfigError
from models.icnn import FilterAssignment, ICNNClassifier
from models.icnn_templates import (apply_position_mask, filter_loss, make_templates, position_masks,
                                   template_priors)


def test_templates_equal_the_formula_n3_beta4():
    t = make_templates(3, beta=4.0)
    tau = 0.5 / 9
    assert t.shape == (10, 3, 3)
    # mu = (0, 0): L1 distances [[0,1,2],[1,2,3],[2,3,4]] -> 1 - 4d/3 clamped at -1
    expected_corner = torch.tensor([[1, -1 / 3, -1], [-1 / 3, -1, -1], [-1, -1, -1]])
    # mu = (1, 1): the centre
    expected_centre = torch.tensor([[-1, -1 / 3, -1], [-1 / 3, 1, -1 / 3], [-1, -1 / 3, -1]])
    torch.testing.assert_close(t[0], tau * expected_corner)
    torch.testing.assert_close(t[4], tau * expected_centre)
    torch.testing.assert_close(t[-1], torch.full((3, 3), -tau))


def test_templates_equal_the_formula_n4_beta2_row_major_positions():
    t = make_templates(4, beta=2.0)
    # mu = (0, 1) is flattened index 1; 1 - 2 d / 4 = 1 - d / 2, clamped at -1
    expected = torch.tensor([[0.5, 1.0, 0.5, 0.0],
                             [0.0, 0.5, 0.0, -0.5],
                             [-0.5, 0.0, -0.5, -1.0],
                             [-1.0, -0.5, -1.0, -1.0]]) / 32
    torch.testing.assert_close(t[1], expected)
    # mu = (2, 0) is flattened index 8: the transpose pattern in the other direction
    assert t[8, 2, 0] == pytest.approx(1 / 32) and t[8, 0, 0] == pytest.approx(0.0)
    torch.testing.assert_close(position_masks(4, 2.0) / 32, t[:16])


def test_priors():
    p = template_priors(3)
    alpha = 9 / 10
    torch.testing.assert_close(p[:9], torch.full((9,), alpha / 9))
    assert p[-1].item() == pytest.approx(1 - alpha)
    assert p.sum().item() == pytest.approx(1.0)


def test_mask_is_relu_of_x_times_template_at_the_argmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    masks = position_masks(4, 4.0)
    tau = 0.5 / 16
    out = apply_position_mask(x, masks)
    for b in range(2):
        for c in range(3):
            i, j = divmod(int(x[b, c].argmax()), 4)
            template = torch.tensor([[tau * max(1 - 4 * (abs(r - i) + abs(s - j)) / 4, -1) for s in range(4)]
                                     for r in range(4)])
            torch.testing.assert_close(out[b, c], torch.relu(x[b, c] * template / tau))


def brute_force_filter_loss(x, labels, filter_class, n, beta=4.0, log_z=None):
    """-MI(X; T) per filter with explicit loops over filters, templates and images (float64 Python math)."""
    tau = 0.5 / n ** 2
    alpha = n ** 2 / (1 + n ** 2)
    mus = [(i, j) for i in range(n) for j in range(n)]
    templates = [[[tau * max(1 - beta * (abs(r - i) + abs(s - j)) / n, -1) for s in range(n)] for r in range(n)]
                 for i, j in mus] + [[[-tau] * n for _ in range(n)]]
    priors = [alpha / n ** 2] * n ** 2 + [1 - alpha]
    B, C = x.shape[:2]
    losses = []
    for c in range(C):
        tr = [[sum(float(x[b, c, r, s]) * templates[t][r][s] for r in range(n) for s in range(n))
               for t in range(len(templates))] for b in range(B)]
        if log_z is None:
            z = [sum(math.exp(tr[b][t]) for b in range(B)) for t in range(len(templates))]
        else:
            z = [math.exp(float(log_z[c, t])) for t in range(len(templates))]
        p_xt = [[math.exp(tr[b][t]) / z[t] for t in range(len(templates))] for b in range(B)]
        p_x = [sum(priors[t] * p_xt[b][t] for t in range(len(templates))) for b in range(B)]
        mi = 0.0
        for t in range(len(templates)):
            for b in range(B):
                positive_image = int(labels[b]) == int(filter_class[c])
                allowed = positive_image if t < n ** 2 else not positive_image
                if allowed:
                    mi += priors[t] * p_xt[b][t] * math.log(p_xt[b][t] / p_x[b])
        losses.append(-mi)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("running", [False, True])
def test_filter_loss_equals_brute_force_mutual_information(running):
    g = torch.Generator().manual_seed(1)
    n = 3
    # large activations so that p(x|T) is far from uniform and every term matters
    x = (torch.rand(5, 2, n, n, generator=g, dtype=torch.float64) * 60)
    labels = torch.tensor([0, 1, 1, 2, 0])
    filter_class = torch.tensor([1, 0])
    log_z = torch.randn(2, n * n + 1, generator=g, dtype=torch.float64) if running else None
    got = filter_loss(x, make_templates(n, dtype=torch.float64), template_priors(n, dtype=torch.float64), labels,
                      filter_class, log_z)
    expected = brute_force_filter_loss(x, labels, filter_class, n, log_z=log_z)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert (expected < 0).all() if not running else True


def test_filter_loss_prefers_a_filter_that_fires_at_one_place_on_its_class_only():
    n, B = 5, 8
    labels = torch.tensor([0, 1] * (B // 2))
    good = torch.zeros(B, 1, n, n)
    good[labels == 0, 0, 1, 3] = 40.0      # its class: one peak; other class: silent
    bad = torch.full((B, 1, n, n), 40.0 / (n * n))   # same mass, spread everywhere and on every class
    args = (make_templates(n), template_priors(n), labels, torch.tensor([0]))
    assert filter_loss(good, *args).item() < filter_loss(bad, *args).item()


def test_assignment_follows_the_class_with_the_highest_mean_activation():
    K, C = 3, 6
    assign = FilterAssignment(C, K, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels = torch.randint(0, K, (12,), generator=g)
        x = torch.rand(12, C, 4, 4, generator=g) * 0.1
        for f in range(C):
            x[labels == f % K, f] += 1.0 + f       # filter f fires on class f % K
        assign.update(x, labels)
    assert assign.filter_class.tolist() == [f % K for f in range(C)]


def test_assignment_moving_average_by_hand():
    assign = FilterAssignment(1, 2, momentum=0.9)
    x1 = torch.tensor([2.0, 4.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    assign.update(x1, torch.tensor([0, 0]))                 # class 0 first seen: mean 3; class 1 unseen: 0
    torch.testing.assert_close(assign.class_activation, torch.tensor([[3.0, 0.0]]))
    x2 = torch.tensor([1.0, 5.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    assign.update(x2, torch.tensor([0, 1]))                 # class 0: 0.9*3 + 0.1*1; class 1 first seen: 5
    torch.testing.assert_close(assign.class_activation, torch.tensor([[2.8, 5.0]]))
    assert assign.filter_class.tolist() == [1]


def _blob_batch(g, n_images=32, size=16, classes=2):
    labels = torch.arange(n_images) % classes
    images = torch.randn(n_images, 1, size, size, generator=g) * 0.1
    for b in range(n_images):
        r, c = (3, 3) if labels[b] == 0 else (11, 11)
        images[b, 0, r - 2:r + 2, c - 2:c + 2] += 2.0
    return images, labels


def test_filter_loss_falls_during_a_short_deterministic_training_run():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ICNNClassifier(2, channels=1, image_size=16, widths=(8, 16), filters=8, loss_weight=1.0)
    images, labels = _blob_batch(g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for _ in range(40):
        loss, terms, _, _ = model.model_step((images, labels), "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), terms["filter_loss"].item(), terms["mi"].item()))
    first, last = history[0], history[-1]
    # measured: total 0.693 -> -0.21, filter loss -0.0008 -> -0.70, mean MI per filter 1e-4 -> 0.087
    assert last[0] < first[0] - 0.5                     # the total loss falls
    assert last[1] < first[1] - 0.4                     # the filter loss itself falls ...
    assert last[2] > first[2] + 0.05                    # ... because the mutual information rises
    assert all(b[1] <= a[1] for a, b in zip(history[::5], history[5::5]))   # and keeps falling


def test_baseline_switch_is_the_same_network_without_masks_and_filter_loss():
    torch.manual_seed(3)
    icnn = ICNNClassifier(3, channels=1, image_size=16, widths=(8, 16), filters=4)
    torch.manual_seed(3)
    base = ICNNClassifier(3, channels=1, image_size=16, widths=(8, 16), filters=4, interpretable=False)
    for (k1, v1), (k2, v2) in zip(icnn.state_dict().items(), base.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    _, maps = base.forward_maps(x)
    masked, unmasked = base.icnn[0](base.backbone(x))
    assert torch.equal(masked, unmasked)                 # identity mask
    loss, terms, logits, _ = base.model_step((x, y), "train")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))
    assert terms == {}
    masked, unmasked = icnn.icnn[0](icnn.backbone(x))
    assert not torch.equal(masked, unmasked) and (masked <= unmasked + 1e-6).all()
    assert "icnn.filters1" in icnn.probe_layers() and icnn.default_probe_layer == "icnn.filters1"


def test_two_layers_and_running_options_train_finitely():
    torch.manual_seed(0)
    model = ICNNClassifier(2, channels=1, image_size=16, widths=(8, 16), filters=4, num_layers=2,
                           z_estimate="running", loss_weight=5e-6, loss_weight_mode="running_activation")
    images, labels = _blob_batch(torch.Generator().manual_seed(0), 8)
    for _ in range(2):
        loss, terms, _, _ = model.model_step((images, labels), "train")
        loss.backward()
        assert torch.isfinite(loss) and set(terms) == {"ce", "filter_loss", "mi"}
    assert bool(model.icnn[1].log_z_ready) and (model.icnn[1].mean_max_activation >= 0).all()


def test_feature_map_too_small_for_templates_names_the_option():
    with pytest.raises(ConfigError, match="datamodule.image_size"):
        ICNNClassifier(2, channels=1, image_size=2, widths=(4, 8))


@pytest.mark.parametrize("bad, option", [({"loss_weight": -1.0}, "model.loss_weight"),
                                         ({"loss_weight_mode": "decay"}, "model.loss_weight_mode"),
                                         ({"z_estimate": "exact"}, "model.z_estimate"),
                                         ({"beta": 0.0}, "model.beta")])
def test_bad_options_name_the_option(bad, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        ICNNClassifier(2, channels=1, image_size=16, widths=(4, 8), **bad)
