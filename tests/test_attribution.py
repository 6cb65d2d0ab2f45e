"""Attribution methods against hand-computed values and captum, their safety inside training (no parameter grads,
hooks removed, model unchanged), the evaluation metrics, and DDP == single process."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from algorithms.attribution import (CAM, METHODS, AttributionResult, GradCAM, GuidedBackprop, GuidedGradCAM,
                                    Occlusion, ProbeMasks, Saliency, average_ranks, curve_auc, deletion_curve,
                                    energy_in_mask, get_method, method_unavailable, pointing_game, randomize_top_layers,
                                    resolve_target, spearman)
from callbacks.attribution import AttributionCallback
from core.errors import CapabilityError, ConfigError
from core.probe import interpretation_mode
from tests.test_attribution_helpers import (SquaresData, SquaresProbe, ToyCAMNet, fake_trainer,  # noqa: F401
                                           one_thread, small_cnn)


X_TOY = torch.tensor([[[[1.0, 2.0], [-1.0, 3.0]]]])  # A_0 = ReLU(x) = [[1,2],[0,3]], A_1 = ReLU(-x) = [[0,0],[1,0]]


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ----- hand-computed values -----------------------------------------------------------------------------------------
def test_cam_and_gradcam_equal_hand_computed_values():
    net = ToyCAMNet()  # W = [[2, 1], [-1, 3]]
    # class 0: CAM = 2 A_0 + A_1 = [[2,4],[1,6]]; Grad-CAM = ReLU(CAM) / Z with Z = 4 positions
    assert torch.allclose(CAM(net).attribute(X_TOY, 0)[0, 0], torch.tensor([[2.0, 4.0], [1.0, 6.0]]))
    assert torch.allclose(GradCAM(net).attribute(X_TOY, 0)[0, 0], torch.tensor([[0.5, 1.0], [0.25, 1.5]]))
    # class 1: CAM = -A_0 + 3 A_1 = [[-1,-2],[3,-3]] (no ReLU in CAM); Grad-CAM keeps only the positive part / 4
    assert torch.allclose(CAM(net).attribute(X_TOY, 1)[0, 0], torch.tensor([[-1.0, -2.0], [3.0, -3.0]]))
    assert torch.allclose(GradCAM(net).attribute(X_TOY, 1)[0, 0], torch.tensor([[0.0, 0.0], [0.75, 0.0]]))
    # without the ReLU, Grad-CAM is CAM / Z exactly
    assert torch.allclose(GradCAM(net).attribute(X_TOY, 1, relu=False)[0, 0],
                          torch.tensor([[-1.0, -2.0], [3.0, -3.0]]) / 4)


def test_gradcam_predicted_target_comes_from_the_same_forward():
    net = ToyCAMNet()  # logits for X_TOY: class 0 = (2*6 + 1)/4 = 3.25, class 1 = (-6 + 3)/4 = -0.75
    g = GradCAM(net)
    g.attribute(X_TOY)
    assert g.target_.tolist() == [0]
    assert torch.allclose(g.scores_, torch.tensor([[3.25, -0.75]]))


def test_cam_equals_gradcam_times_positions_for_gap_linear_head():
    """Grad-CAM = ReLU(CAM) / Z, Z = h*w positions of the probed layer (8x8 = 64 for 32 px input)."""
    model = small_cnn()
    x = torch.randn(3, 3, 32, 32)
    g = GradCAM(model)
    gc = g.attribute(x, upsample_to_input=False)
    cam = CAM(model).attribute(x, g.target_, upsample_to_input=False)
    Z = gc.shape[-1] * gc.shape[-2]
    assert Z == 64
    assert torch.allclose(gc, cam.clamp_min(0) / Z, atol=1e-7 * float(cam.abs().max()) + 1e-9)


def test_gradcam_matches_captum_layer_gradcam():
    from captum.attr import LayerAttribution, LayerGradCam
    model = small_cnn()
    x = torch.randn(4, 3, 32, 32)
    g = GradCAM(model, "backbone.conv3")
    ours = g.attribute(x)
    ref = LayerGradCam(model, model.get_probe_layer("backbone.conv3")).attribute(x, target=g.target_,
                                                                                  relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, (32, 32), "bilinear")
    assert torch.allclose(ours, ref.detach(), rtol=1e-4, atol=1e-9)


def test_saliency_equals_input_grad_of_a_direct_backward():
    model = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([1, 3])
    ours = Saliency(model).attribute(x, t)
    xr = x.clone().requires_grad_(True)
    model(xr).gather(1, t[:, None]).sum().backward()
    assert torch.allclose(ours[:, 0], xr.grad.abs().amax(1))
    model.zero_grad(set_to_none=True)


class TinyReLUNet(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.fc1, self.relu1 = nn.Linear(3, 4), nn.ReLU(inplace=inplace)
        self.fc2, self.relu2 = nn.Linear(4, 4), nn.ReLU(inplace=inplace)
        self.fc3 = nn.Linear(4, 2)
        torch.manual_seed(3)
        for m in (self.fc1, self.fc2, self.fc3):
            nn.init.normal_(m.weight)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_passes_only_positive_gradients_and_restores_the_model(inplace):
    net = TinyReLUNet(inplace)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 3)
    t = torch.tensor([0, 1, 0, 1, 1])
    ours = GuidedBackprop(net).attribute(x, t)
    # by hand: at each ReLU keep clamp(grad, 0) where the forward input was positive
    h1 = net.fc1(x)
    h2 = net.fc2(h1.clamp_min(0))
    g = net.fc3.weight[t]                                           # d y_t / d relu2 output
    g = g.clamp_min(0) * (h2 > 0)
    g = g @ net.fc2.weight
    g = g.clamp_min(0) * (h1 > 0)
    expected = g @ net.fc1.weight
    assert torch.allclose(ours, expected.detach(), atol=1e-6)
    # guidance must change something on this net, or the test proves nothing
    xr = x.clone().requires_grad_(True)
    net(xr).gather(1, t[:, None]).sum().backward()
    assert not torch.allclose(ours, xr.grad)
    assert all_hooks(net) == 0
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_guided_backprop_matches_captum_on_the_cnn():
    from captum.attr import GuidedBackprop as CaptumGB
    model = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    ours = GuidedBackprop(model).attribute(x, 1)
    with pytest.warns(UserWarning):
        ref = CaptumGB(model).attribute(x.clone(), target=1)
    assert torch.allclose(ours, ref, atol=1e-8)
    assert all_hooks(model) == 0


def test_guided_gradcam_is_guided_backprop_times_gradcam():
    model = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    ggc = GuidedGradCAM(model).attribute(x, 2)
    assert torch.allclose(ggc, GuidedBackprop(model).attribute(x, 2) * GradCAM(model).attribute(x, 2))


def test_occlusion_drop_of_a_linear_model_by_hand():
    """A linear 'model' y = sum of the pixels: occluding a w x w patch with 0 drops the score by its sum."""
    class Sum(nn.Module):
        def forward(self, x):
            return torch.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)
    x = torch.ones(1, 1, 4, 4)
    maps = Occlusion(Sum(), window=2, stride=2).attribute(x, 0)
    assert torch.allclose(maps, torch.full((1, 1, 4, 4), 4.0))  # each pixel in one patch, drop 4


# ----- no side effects ----------------------------------------------------------------------------------------------
def test_parameter_grads_untouched_and_hooks_removed_by_every_method():
    model = small_cnn()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    x = torch.randn(2, 3, 32, 32)
    for name, cls in METHODS.items():
        if method_unavailable(name, model):
            with pytest.raises(CapabilityError):
                cls(model)
            continue
        maps = (cls(model, window=16, stride=16) if cls is Occlusion else cls(model)).attribute(x, None)
        assert maps.shape[0] == 2 and maps.shape[-2:] == (32, 32), name
        assert torch.isfinite(maps).all(), name
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all_hooks(model) == 0
    assert not model.training


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", ["gradcam", "cam", "guided_backprop", "guided_gradcam"])
def test_hooks_removed_after_an_exception(name):
    model = small_cnn()
    model.pool = Boom()  # fails above the probe layer, after the hooks are in place
    with pytest.raises(RuntimeError, match="boom"):
        get_method(name)(model).attribute(torch.randn(1, 3, 32, 32))
    assert all_hooks(model) == 0
    assert torch.is_grad_enabled()


# ----- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_method_and_layer_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="gradcam.*saliency.*occlusion"):
        get_method("gradcan")
    with pytest.raises(ValueError, match="gradcam"):
        AttributionCallback(methods=["nope"])
    with pytest.raises(ConfigError, match="backbone.conv1.*backbone.conv4"):
        GradCAM(small_cnn(), "backbone.conv9")


def test_target_class_out_of_range_errors():
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="out of range.*4 classes"):
        resolve_target(4, scores)
    with pytest.raises(ValueError, match="out of range"):
        resolve_target(torch.tensor([0, -1]), scores)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        resolve_target([0, 1, 2], scores)
    with pytest.raises(ValueError, match="predicted"):
        resolve_target("true", scores)
    with pytest.raises(ValueError, match="out of range"):
        GradCAM(small_cnn()).attribute(torch.randn(2, 3, 32, 32), 7)
    assert resolve_target(torch.tensor([3, 0]), scores).tolist() == [3, 0]


def test_cam_refuses_a_layer_that_is_not_pooled_into_the_head():
    with pytest.raises(ValueError, match="global average"):
        CAM(small_cnn(), "backbone.conv2").attribute(torch.randn(1, 3, 32, 32))


# ----- evaluation ---------------------------------------------------------------------------------------------------
def test_pointing_game_ignores_empty_masks():
    heat = torch.zeros(3, 4, 4)
    heat[:, 1, 1] = 1.0
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True          # hit
    mask[1, 3, 3] = True          # miss
    # image 2: empty mask -> neither a hit nor counted
    hit, valid = pointing_game(heat, mask)
    assert hit.tolist() == [True, False, False] and valid.tolist() == [True, True, False]
    # with a tolerance (Zhang et al.: 15 px at 224 px) a peak near the object counts: (1,1) is sqrt(8) from (3,3)
    assert pointing_game(heat, mask, tolerance=2.9)[0].tolist() == [True, True, False]
    assert pointing_game(heat, mask, tolerance=2.8)[0].tolist() == [True, False, False]
    flat = torch.zeros(1, 4, 4)   # a constant map has no maximum: a miss, not a lucky argmax
    assert pointing_game(flat, torch.ones(1, 4, 4, dtype=torch.bool))[0].tolist() == [False]


def test_energy_in_mask_by_hand():
    heat = torch.tensor([[[1.0, 3.0], [-2.0, 0.0]]])
    mask = torch.tensor([[[True, False], [True, True]]])
    assert torch.allclose(energy_in_mask(heat, mask), torch.tensor([0.25]))  # positive energy 4, inside 1


def test_deletion_curve_and_auc_by_hand():
    """Scores (s, 0): deleting pixels (set to 0) in order of the map lowers s by their values."""
    class SumScore(nn.Module):
        def forward(self, x):
            s = x.sum((1, 2, 3))
            return torch.stack([s, torch.zeros_like(s)], 1)
    x = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    heat = x[:, 0].clone()
    curve = deletion_curve(SumScore(), x, heat, torch.tensor([0]), steps=4)
    expected = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0])
    assert torch.allclose(curve[0], torch.sigmoid(expected))  # softmax over (s, 0) = sigmoid(s)
    assert torch.allclose(curve_auc(curve), (torch.sigmoid(expected)[:-1] + torch.sigmoid(expected)[1:]).sum() / 8)
    with pytest.raises(ValueError, match="1..20"):
        deletion_curve(SumScore(), x, heat, torch.tensor([0]), steps=50)


def test_deletion_curve_reuses_the_methods_scores_and_runs_the_all_deleted_image_once():
    """The first column comes from the caller's scores of the unmodified inputs when given (no forward pass of
    them), the last from one image (all pixels replaced is the same image for every input); the curve equals the one
    computed image by image, step by step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    x, heat, target = torch.randn(6, 3, 8, 8), torch.rand(6, 8, 8), torch.randint(0, 5, (6,))
    with torch.no_grad():
        scores = model(x)
    seen.clear()
    curve = deletion_curve(model, x, heat, target, steps=4, max_batch=12, scores=scores)
    assert seen == [1, 12, 6]  # the all-deleted image once; the 3 steps in between in chunks of 2 steps x 6 images
    order = heat.flatten(1).argsort(1, descending=True)
    for i in range(6):
        for k, n in enumerate([0, 16, 32, 48, 64]):
            xi = x[i].clone().flatten(1)
            xi[:, order[i, :n]] = 0.0
            with torch.no_grad():
                p = model(xi.view(1, 3, 8, 8)).softmax(1)[0, target[i]]
            assert abs(curve[i, k].item() - p.item()) < 1e-6, (i, k)
    seen.clear()
    torch.testing.assert_close(deletion_curve(model, x, heat, target, steps=4, max_batch=12), curve)
    assert seen == [6, 1, 12, 6]  # without scores: one more pass, of the unmodified inputs


def test_spearman_with_ties_equals_scipy():
    from scipy.stats import spearmanr
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 50), generator=g).float()
    b = a + torch.randint(0, 3, (3, 50), generator=g).float()
    ours = spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-6)
    assert average_ranks(torch.tensor([[5.0, 1.0, 5.0]])).tolist() == [[1.5, 0.0, 1.5]]
    assert spearman(torch.zeros(1, 4), torch.arange(4.0)[None]).item() == 0.0


def test_randomize_top_layers_works_on_a_copy():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = randomize_top_layers(model, num_layers=1, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # live model untouched
    rs = rand.state_dict()
    assert all(torch.equal(rs[k], before[k]) for k in before if k.startswith("backbone.stages.conv3"))
    assert not torch.equal(rs["head.weight"], before["head.weight"])
    assert not torch.equal(rs["backbone.stages.conv4.0.0.weight"], before["backbone.stages.conv4.0.0.weight"])
    again = randomize_top_layers(model, num_layers=1, seed=0).state_dict()
    assert all(torch.equal(again[k], rs[k]) for k in rs)  # same seed, same copy (on every rank)
    with pytest.raises(ValueError, match="sanity_layers"):
        randomize_top_layers(model, num_layers=9)


def test_probe_masks_are_the_conjunction_of_the_class_concepts():
    probe = SquaresProbe(n=4, size=16, empty_every=4)
    masks = ProbeMasks(probe)
    item = probe[0]
    seg = item["seg"]
    assert torch.equal(masks(item), (seg[0] == 1) & (seg[1] == 2 + int(item["label"])))
    item["label"] = torch.tensor(1)  # wrong colour for this object: empty mask
    assert not masks(item).any()
    assert not masks(probe[3]).any()  # the empty image


# ----- the callback -------------------------------------------------------------------------------------------------
def _callback(**kw):
    kw.setdefault("max_images", 12)
    kw.setdefault("num_render", 3)
    kw.setdefault("batch_size", 5)
    kw.setdefault("render_methods", ["gradcam", "guided_backprop", "guided_gradcam"])
    kw.setdefault("deletion_methods", None)  # every evaluated method (the yaml default is gradcam only)
    return AttributionCallback(**kw)


def test_callback_metrics_outputs_and_no_side_effects(tmp_path):
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    model.train()
    cb = _callback()
    data = SquaresData(n=12, size=32, empty_every=4)
    with interpretation_mode(model):
        metrics = cb.run(fake_trainer(tmp_path, data), model, 0)
    assert model.training
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(opt.state[k][kk], vv) for k, v in opt_state.items() for kk, vv in v.items())
    assert all_hooks(model) == 0
    for m in ("gradcam", "cam", "saliency"):
        assert 0 <= metrics[f"{m}/pointing_game"] <= 1 and 0 <= metrics[f"{m}/energy"] <= 1
        assert 0 <= metrics[f"{m}/deletion_auc"] <= 1
    assert -1 <= metrics["gradcam/sanity_spearman"] <= 1
    out = tmp_path / "interp" / "attribution" / "epoch_000"
    assert (out / "overlays.png").stat().st_size > 1000
    saved = AttributionResult.load(out / "metrics.json")
    assert saved.flat() == pytest.approx(metrics) and saved.num_images == 12
    assert saved.layer == "backbone.conv4" and saved.target == "true" and saved.epoch == 0


def test_callback_pointing_game_on_an_oracle_map(tmp_path):
    """A model whose evidence is the object itself (the colour excess over the grey background) points at the object
    every time: pointing game 1 over the non-empty masks (a third of the images have none and are excluded)."""
    class Oracle(nn.Module):
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.feat = nn.Sequential(nn.Identity())
            self.head = nn.Linear(3, 4)

        def probe_layers(self):
            from collections import OrderedDict
            return OrderedDict([("feat", self.feat)])

        def get_probe_layer(self, name=None):
            return self.feat

        def forward(self, x):
            a = self.feat(x.abs())
            return self.head(a.mean((2, 3)))
    torch.manual_seed(0)
    oracle = Oracle()
    with torch.no_grad():
        oracle.head.weight.fill_(1.0)
    cb = _callback(methods=["gradcam"], render_methods=[], sanity_method=None, target="predicted")
    metrics = cb.run(fake_trainer(tmp_path, SquaresData(n=12, size=32, empty_every=3)), oracle, 0)
    assert metrics["gradcam/pointing_game"] == 1.0
    assert metrics["gradcam/energy"] > 0.3


def _ddp_callback_metrics(rank, world_size, tmp):
    """Both callbacks on this rank's shard; returns the attribution metrics and featviz's gathered top patches."""
    from pathlib import Path

    from algorithms.featviz import FeatvizResult
    from callbacks.featviz import FeatureVisualizationCallback
    model = small_cnn()
    data = SquaresData(n=13, size=32, empty_every=4)
    cb = _callback(render_methods=["gradcam"])
    fv = FeatureVisualizationCallback(num_units=3, classes=False, steps=2, k_patches=3, max_images=13, batch_size=4)
    with interpretation_mode(model):
        metrics = cb.run(fake_trainer(Path(tmp), data), model, 0)
        fv_metrics = fv.run(fake_trainer(Path(tmp), data), model, 0)
    patches = None
    if rank == 0:
        saved = FeatvizResult.load(Path(tmp) / "interp" / "featviz" / "epoch_000" / "featviz.json")
        patches = vars(saved.top_patches)
    return metrics, sorted(fv_metrics), patches


@pytest.mark.ddp
def test_two_process_metrics_equal_single_process(tmp_path):
    from tests.ddp_utils import run_ddp
    single, fv_keys, single_patches = _ddp_callback_metrics(0, 1, str(tmp_path / "single"))
    results = run_ddp(_ddp_callback_metrics, 2, (str(tmp_path / "ddp"),))
    (m0, k0, patches), (m1, k1, _) = results
    assert m0 == m1 and k0 == k1 == fv_keys  # identical scalars on every rank (logged without a sync)
    assert m0.keys() == single.keys()
    for k in single:
        assert m0[k] == pytest.approx(single[k], abs=1e-5), k
    assert patches["dataset_index"] == single_patches["dataset_index"]  # shards 0-6 and 7-12 merged exactly
    assert patches["position"] == single_patches["position"]
    assert (tmp_path / "ddp" / "interp" / "attribution" / "epoch_000" / "overlays.png").exists()


def test_overlay_sheet_blends_jet_over_the_image_and_places_every_cell():
    """heat_overlay = 0.5 image + 0.5 jet(min-max scaled map) (jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0));
    gradient images centred on grey; every cell of the sheet is its image pixel for pixel at the reported box."""
    import numpy as np
    from PIL import Image
    from algorithms.attribution.render import gradient_image, heat_overlay, render_overlays
    over = heat_overlay(torch.zeros(3, 1, 2), torch.tensor([[0.0, 4.0]]))
    torch.testing.assert_close(over[:, 0, 0], torch.tensor([0.0, 0.0, 0.25]))
    torch.testing.assert_close(over[:, 0, 1], torch.tensor([0.25, 0.0, 0.0]))
    torch.testing.assert_close(gradient_image(torch.tensor([[[-2.0, 1.0]]])), torch.tensor([[[0.0, 0.75]]]))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    maps = {"gradcam": torch.rand(3, 1, 16, 16, generator=g), "saliency": torch.randn(3, 3, 16, 16, generator=g)}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        layout = render_overlays(images, maps, f"{d}/o.png", ["a", "b", "c"], title="t")
        sheet = np.asarray(Image.open(f"{d}/o.png").convert("RGB"))
    side = layout["cell"]
    for r in range(3):
        expected = [images[r], heat_overlay(images[r], maps["gradcam"][r, 0]), gradient_image(maps["saliency"][r])]
        for (x, y), want in zip(layout["boxes"][r], expected):
            want = (want.permute(1, 2, 0) * 255).round().byte().numpy().repeat(side // 16, 0).repeat(side // 16, 1)
            assert (sheet[y:y + side, x:x + side] == want).all()


def test_headers_wrap_at_spaces_and_underscores_and_keep_them():
    from core.image_sheet import font, wrap
    f = font()
    assert wrap("optimised image", 96, f) == "optimised image"
    assert wrap("top probe patches", 96, f) == "top probe\npatches"
    assert wrap("guided_backprop", 96, f) == "guided_\nbackprop"
