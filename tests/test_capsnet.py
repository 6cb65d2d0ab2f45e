"""CapsNet: routing against a plain transcription of Procedure 1, squash, margin loss by hand, reconstruction
masking, shift augmentation, grid sizes and bad configuration."""
from __future__ import annotations

import pytest
import torch

from algorithms.capsules import PERTURBATIONS, coupling_to_prediction, perturb_capsule_dimensions
from models.capsnet import CapsNet, margin_loss, random_shift
from core.errors import ConfigError
from models.routing import dynamic_routing, squash


def loop_routing(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1 of Sabour et al. written out with loops over children i and parents j; u_hat [I, J, D] for one
    example. The softmax runs over the parents j of each child i."""
    I, J, D = u_hat.shape
    b = [[0.0] * J for _ in range(I)]
    for r in range(iterations):
        c = []
        for i in range(I):
            e = [torch.exp(torch.as_tensor(b[i][j], dtype=torch.float64)) for j in range(J)]
            total = sum(e)
            c.append([e[j] / total for j in range(J)])
        v = []
        for j in range(J):
            s = sum(c[i][j] * u_hat[i, j] for i in range(I))
            n2 = float((s * s).sum())
            v.append(s * (n2 / (1 + n2)) / (n2 ** 0.5))
        for i in range(I):
            for j in range(J):
                b[i][j] = b[i][j] + float((u_hat[i, j] * v[j]).sum())
    return torch.stack(v), torch.tensor([[float(x) for x in row] for row in c], dtype=torch.float64)


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_equals_loop_transcription(iterations):
    torch.manual_seed(0)
    B, I, J, D = 2, 7, 4, 5
    votes = torch.randn(B, J, I, D, dtype=torch.float64)
    v, c = dynamic_routing(votes, iterations, detach_votes=False)
    for b in range(B):
        v_ref, c_ref = loop_routing(votes[b].permute(1, 0, 2), iterations)
        torch.testing.assert_close(v[b], v_ref, rtol=1e-6, atol=1e-8)  # squash epsilon 1e-8
        torch.testing.assert_close(c[b], c_ref, rtol=1e-6, atol=1e-8)  # squash epsilon 1e-8
    # softmax over the parents: every child's couplings sum to 1 over j, not over i
    torch.testing.assert_close(c.sum(-1), torch.ones(B, I, dtype=torch.float64))
    if iterations > 1:
        assert not torch.allclose(c.sum(1), torch.ones(B, J, dtype=torch.float64))


def test_detached_votes_change_gradients_not_values():
    torch.manual_seed(1)
    votes = torch.randn(3, 4, 9, 6, requires_grad=True)
    v1, c1 = dynamic_routing(votes, 3, detach_votes=True)
    v2, c2 = dynamic_routing(votes, 3, detach_votes=False)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(c1, c2)
    g1, = torch.autograd.grad(v1.pow(2).sum(), votes)
    g2, = torch.autograd.grad(v2.pow(2).sum(), votes)
    assert not torch.allclose(g1, g2)
    # with detached votes the final couplings are constants: the gradient is c_ij * dL/ds_j
    with torch.no_grad():
        s = torch.matmul(c1.transpose(1, 2).unsqueeze(2), votes).squeeze(2).requires_grad_()
    gs, = torch.autograd.grad(squash(s).pow(2).sum(), s)
    torch.testing.assert_close(g1, c1.transpose(1, 2).unsqueeze(-1) * gs.unsqueeze(2))


def test_squash_lengths_in_unit_interval_and_finite_at_zero():
    s = torch.cat([torch.zeros(1, 16), 1e-6 * torch.randn(5, 16), torch.randn(50, 16), 50 * torch.randn(5, 16)])
    s.requires_grad_()
    v = squash(s)
    lengths = v.norm(dim=-1)
    assert bool((lengths >= 0).all()) and bool((lengths < 1).all())
    n = s.detach().norm(dim=-1)
    torch.testing.assert_close(lengths[1:], (n ** 2 / (1 + n ** 2))[1:], rtol=1e-4, atol=1e-7)
    v.sum().backward()
    assert bool(torch.isfinite(s.grad).all())
    assert float(lengths[0].detach()) == 0.0
    # mathematically < 1 for any finite s; in float64 even |s| = 1e6 stays below 1
    assert float(squash(torch.full((1, 16), 2.5e5, dtype=torch.float64)).norm()) < 1.0


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.30, 0.05], [0.50, 0.08, 0.20]])
    labels = torch.tensor([0, 0])
    # image 1: 0 + 0.5 * (0.3 - 0.1)^2 + 0 = 0.02;  image 2: (0.9 - 0.5)^2 + 0 + 0.5 * (0.2 - 0.1)^2 = 0.165
    torch.testing.assert_close(margin_loss(lengths, labels), torch.tensor((0.02 + 0.165) / 2))
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([1, 2])),
                               torch.tensor(((0.5 * 0.85 ** 2 + 0.6 ** 2) + (0.5 * 0.4 ** 2 + 0.7 ** 2)) / 2))


def small_capsnet(**kw) -> CapsNet:
    torch.manual_seed(0)
    kw = {"num_classes": 4, "channels": 1, "image_size": 28, "conv_channels": 16, "primary_types": 4, **kw}
    return CapsNet(**kw)


def test_grid_sizes_from_input_geometry():
    assert CapsNet(num_classes=10, channels=1, image_size=28).num_primary == 6 * 6 * 32
    rgb = CapsNet(num_classes=10, channels=3, image_size=32, conv_channels=8)
    assert (rgb.grid_size, rgb.primary_types, rgb.num_primary) == (8, 64, 8 * 8 * 64)
    out = rgb.capsules(torch.randn(2, 3, 32, 32), reconstruct=True)
    assert out.lengths.shape == (2, 10) and out.reconstruction.shape == (2, 3, 32, 32)
    assert out.couplings.shape == (2, 8 * 8 * 64, 10)


def test_reconstruction_masked_by_label_in_training_and_by_prediction_otherwise():
    model = small_capsnet(shift_pixels=0)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = (pred + 1) % 4  # never the prediction
    seen = []
    handle = model.decoder[0].register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    try:
        for stage in ("train", "val", "test"):
            model.model_step((x, labels), stage)
    finally:
        handle.remove()
    for stage, inp, expected in zip(("train", "val", "test"), seen, (labels, pred, pred)):
        active = inp.view(6, 4, 16).abs().sum(-1) > 0
        assert torch.equal(active, torch.nn.functional.one_hot(expected, 4).bool()), stage


def test_reconstruction_switch_and_loss_terms():
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    on = small_capsnet(shift_pixels=0)
    loss_on, terms_on, _, _ = on.model_step((x, y), "train")
    expected = terms_on["margin_loss"] + 0.0005 * terms_on["reconstruction_loss"]
    torch.testing.assert_close(loss_on.detach(), expected)
    off = small_capsnet(shift_pixels=0, reconstruction=False)
    loss_off, terms_off, _, _ = off.model_step((x, y), "train")
    assert "reconstruction_loss" not in terms_off
    torch.testing.assert_close(loss_off, terms_off["margin_loss"])


def test_random_shift_translates_each_image_with_fill():
    torch.manual_seed(3)
    x = torch.rand(20, 2, 10, 12)
    fill = torch.tensor([-1.0, -2.0])
    out = random_shift(x, 2, fill)
    padded = torch.nn.functional.pad(x - fill.view(1, 2, 1, 1), (2, 2, 2, 2)) + fill.view(1, 2, 1, 1)
    offsets = set()
    for n in range(20):
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[n], padded[n, :, dy:dy + 10, dx:dx + 12])]
        assert match, f"image {n} is not a translation of its input"
        offsets.add(match[0])
    assert len(offsets) > 3  # random per image


def test_perturbation_grid_and_couplings():
    model = small_capsnet().eval()
    x = torch.randn(3, 1, 28, 28)
    recon, pred = perturb_capsule_dimensions(model, x)
    assert recon.shape == (3, 16, len(PERTURBATIONS), 1, 28, 28)
    assert PERTURBATIONS[5] == 0.0 and len(PERTURBATIONS) == 11
    with torch.no_grad():
        reference = model.capsules(x, reconstruct=True).reconstruction
    for d in range(16):  # the unperturbed column is the ordinary reconstruction from the predicted capsule
        torch.testing.assert_close(recon[:, d, 5], reference)
    assert not torch.allclose(recon[:, 0, 0], recon[:, 0, -1])
    coupling, pred2 = coupling_to_prediction(model, x)
    assert torch.equal(pred, pred2) and coupling.shape == (3, 4, 6, 6)
    with torch.no_grad():
        c = model.capsules(x, reconstruct=False).couplings
    torch.testing.assert_close(coupling.flatten(1), c[torch.arange(3), :, pred])


@pytest.mark.parametrize("kwargs,option", [({"image_size": 16}, "datamodule.image_size"),
                                           ({"routing_iterations": 0}, "model.routing_iterations"),
                                           ({"shift_pixels": -1}, "model.shift_pixels")])
def test_bad_configuration_names_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        CapsNet(num_classes=10, **kwargs)


@pytest.mark.parametrize("size,kernel,stride", [(20, 9, 2), (21, 9, 2), (13, 3, 3), (11, 4, 2)])
def test_polyphase_conv_equals_conv2d_values_and_gradients(size, kernel, stride):
    from models.capsnet import PolyphaseConv2d
    torch.manual_seed(6)
    conv = PolyphaseConv2d(5, 7, kernel, stride=stride).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=stride)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
