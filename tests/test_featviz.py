"""Feature visualization pieces against hand-computed values, its safety (parameter grads, hooks, mode), and the
callback's outputs."""
from __future__ import annotations

import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from algorithms.featviz import (AffineTransform, FeatvizResult, FourierImage, Objective, PixelImage, channel,
                                class_logit, colour_correlation_sqrt, compose, crop_patches, diversity,
                                first_layer_filters, fit_size, jitter, neuron, objective_forward, pad, random_rotate,
                                random_scale, standard_transforms, top_activations, unit_activation, visualize)
from callbacks.featviz import FeatureVisualizationCallback
from core.errors import ConfigError
from core.probe import interpretation_mode
from models.base import ClassifierModule
from tests.test_attribution_helpers import SquaresData, fake_trainer, one_thread, small_cnn  # noqa: F401
from tests.test_attribution import all_hooks


def test_objectives_add_scale_and_address_one_element_per_unit():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    ctx = SimpleNamespace(acts={"L": a}, scores=torch.tensor([[1.0, 5.0], [7.0, 3.0]]))
    # element 0 -> channel 2 (mean of 8..11 = 9.5), element 1 -> channel 0 (mean of 12..15 = 13.5)
    assert channel("L", [2, 0])(ctx).tolist() == [9.5, 13.5]
    assert channel("L", [1], offset=1)(ctx).tolist() == [0.0, 17.5]  # element 0 is not addressed
    assert neuron("L", [0, 1], y=1, x=0)(ctx).tolist() == [2.0, 18.0]
    obj = channel("L", [2, 0]) - 0.5 * class_logit([1, 0]) + 1
    assert obj(ctx).tolist() == [9.5 - 2.5 + 1, 13.5 - 3.5 + 1]
    assert obj.layers == ("L",) and obj.needs_scores
    with pytest.raises(ValueError, match="batch"):
        channel("L", [0, 1, 2])(ctx)
    # max pooling (ProtoPNet's prototypes): element 0 -> max of 8..11, element 1 -> max of 12..15
    assert channel("L", [2, 0], pooling="max")(ctx).tolist() == [11.0, 15.0]
    with pytest.raises(ValueError, match="mean, max"):
        channel("L", [0], pooling="median")


def test_layer_pooling_is_the_models_declaration_checked():
    from core.probe import layer_pooling
    model = SimpleNamespace(layer_pooling={"protos": "max", "bad": "median"})
    assert layer_pooling(model, "protos") == "max" and layer_pooling(model, "protos:pre_relu") == "max"
    assert layer_pooling(model, "conv") == "mean" and layer_pooling(SimpleNamespace(), "conv") == "mean"
    with pytest.raises(ConfigError, match=r"layer_pooling\['bad'\]='median'"):
        layer_pooling(model, "bad")


def test_diversity_is_minus_the_mean_gram_cosine_similarity():
    a = torch.zeros(3, 2, 1, 1)
    a[0, 0] = a[1, 0] = 1.0   # elements 0 and 1 share a Gram matrix, element 2 is orthogonal to both
    a[2, 1] = 1.0
    ctx = SimpleNamespace(acts={"L": a}, scores=None)
    assert diversity("L")(ctx).tolist() == pytest.approx([-0.5, -0.5, 0.0])


def test_fourier_parametrisation_starts_grey_with_1_over_f_scaling():
    p = FourierImage(2, 3, 16, generator=torch.Generator().manual_seed(0))
    img = p()
    assert img.shape == (2, 3, 16, 16) and ((img - 0.5).abs() < 0.05).all()
    assert p.scale[0, 0] == 16 and p.scale[0, 1] == pytest.approx(16.0)  # f = 1/16 -> 16
    assert p.scale[0, 4] == pytest.approx(4.0) and p.scale[4, 3] == pytest.approx(1 / (0.25 ** 2 + (3 / 16) ** 2)
                                                                                  ** 0.5)
    assert PixelImage(1, 1, 8)().shape == (1, 1, 8, 8)


def test_colour_correlation_sqrt_squares_to_the_covariance():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 1, 8, 8, generator=g)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.rand(64, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8,
                                                                                                   generator=g)], 1)
    m = colour_correlation_sqrt(images)
    cov = torch.cov(images.transpose(0, 1).flatten(1))
    assert torch.allclose(m @ m, cov, atol=1e-5)


def test_transforms_shapes_and_fused_affine_equals_sequential():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 20, 20)
    assert pad(3)(img, g).shape[-1] == 26 and jitter(4)(img, g).shape[-1] == 16
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([yy, xx, yy * xx])[None].repeat(4, 1, 1, 1)
    fused = compose([random_scale(), random_rotate(10)])(smooth, torch.Generator().manual_seed(1))
    g2 = torch.Generator().manual_seed(1)
    seq = random_rotate(10)(random_scale()(smooth, g2), g2)
    # one resampling vs two: equal away from the border on a smooth (bilinear-exact) image
    assert torch.allclose(fused[..., 16:48, 16:48], seq[..., 16:48, 16:48], atol=1e-5)
    assert isinstance(random_scale(), AffineTransform)
    assert standard_transforms(64 / 224)(torch.rand(1, 3, 64, 64), g).shape[-1] == 64 + 2 * 3 - 2 - 1


def test_visualize_raises_units_and_leaves_the_model_alone():
    model = small_cnn().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    layer = "backbone.conv3"
    param = FourierImage(4, 3, 32, generator=torch.Generator().manual_seed(0))
    before = unit_activation(model, layer, param().detach(), range(4))
    images, info = visualize(model, channel(layer + ":pre_relu", range(4)), param, standard_transforms(32 / 224),
                             steps=150)
    after = unit_activation(model, layer, images, range(4))
    # post-ReLU activations rise, also for a unit that is off on the initial image (zero gradient after the ReLU)
    assert (after > before).all() and (before == 0).any() and info["objective"][-1] > info["objective"][0]
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert all_hooks(model) == 0
    assert model.training and all(m.training for m in model.modules())


def test_forward_stops_after_the_deepest_hooked_layer():
    model = small_cnn()
    calls = []
    h = model.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        objective_forward(model, channel("backbone.conv2", [0]), torch.randn(1, 3, 32, 32))
        assert calls == []  # the head never ran
        objective_forward(model, channel("backbone.conv2", [0]) + class_logit([1]), torch.randn(1, 3, 32, 32))
        assert calls == [1]
    finally:
        h.remove()


def test_pre_relu_hook_point_is_the_relu_input():
    model = small_cnn()
    x = torch.randn(2, 3, 32, 32)
    pre = objective_forward(model, channel("backbone.conv4:pre_relu", [0, 1]), x)
    post = objective_forward(model, channel("backbone.conv4", [0, 1]), x)
    stage = model.get_probe_layer("backbone.conv4")[0]
    with torch.no_grad():
        z = stage[1](stage[0](model.backbone.stages[:3](x)))  # conv -> BN, before the ReLU
    assert torch.allclose(pre, z[[0, 1], [0, 1]].mean((1, 2)), atol=1e-6)
    assert torch.allclose(post, z.clamp_min(0)[[0, 1], [0, 1]].mean((1, 2)), atol=1e-6)
    class NoReLU(torch.nn.Sequential):
        def probe_layers(self):
            return {"0": self[0]}
    with pytest.raises(ConfigError, match="no nn.ReLU"):
        objective_forward(NoReLU(torch.nn.Identity()), channel("0:pre_relu", [0]), x)


def test_hooks_removed_after_an_exception_in_the_objective():
    model = small_cnn()

    def bad(ctx):
        raise RuntimeError("objective failed")
    with pytest.raises(RuntimeError, match="objective failed"):
        visualize(model, Objective(bad, ["backbone.conv2"], needs_scores=True), PixelImage(1, 3, 32), steps=2)
    assert all_hooks(model) == 0


def test_top_activations_equal_brute_force_and_patches_are_exact():
    model = small_cnn()
    x = torch.randn(10, 3, 32, 32)
    top = top_activations(model, "backbone.conv2", [x[:4], x[4:7], x[7:]], [0, 3], k=3, index_offset=100)
    vals, idx, pos, size = top.values, top.indices, top.positions, top.map_size
    cap = []
    h = model.get_probe_layer("backbone.conv2").register_forward_hook(lambda m, i, o: cap.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    a = cap[0][:, [0, 3]].flatten(2)  # [10, 2, h*w]
    best = a.amax(2).topk(3, dim=0)
    assert torch.equal(vals, best.values) and torch.equal(idx, best.indices + 100)
    arg = a.argmax(2).gather(0, best.indices)
    assert top.count == 10 and torch.allclose(top.mean_sum, a.mean(2).sum(0), atol=1e-5)
    assert torch.allclose(top.max_sum, a.amax(2).sum(0), atol=1e-5)  # the data mean of a max-pooled unit
    assert torch.equal(pos[..., 0] * size[1] + pos[..., 1], arg)
    img = torch.arange(2 * 8 * 8, dtype=torch.float).view(1, 2, 8, 8)
    patch = crop_patches(img, torch.tensor([[1, 2]]), (4, 4), 4)  # map (1,2) of 4x4 -> centre (3,5) of 8x8
    assert torch.equal(patch[0], img[0, :, 1:5, 3:7])
    patch = crop_patches(img, torch.tensor([[3, 3]]), (4, 4), 4)  # clamped inside the image
    assert torch.equal(patch[0], img[0, :, 4:8, 4:8])


def test_first_layer_filters_are_images():
    f = first_layer_filters(small_cnn())
    assert f.shape == (8, 3, 3, 3) and f.min() >= 0 and f.max() <= 1
    assert torch.allclose((f - 0.5).flatten(1).abs().amax(1), torch.full((8,), 0.5))


def test_callback_writes_grids_and_json(tmp_path):
    model = small_cnn()
    cb = FeatureVisualizationCallback(num_units=3, steps=6, k_patches=2, max_images=10, batch_size=4)
    with interpretation_mode(model):
        metrics = cb.run(fake_trainer(tmp_path, SquaresData(n=10, size=32)), model, 2)
    out = tmp_path / "interp" / "featviz" / "epoch_002"
    for name in ("units.png", "classes.png", "filters.png", "patches.png", "unit_sheet.png", "class_sheet.png"):
        assert (out / name).stat().st_size > 100, name
    saved = FeatvizResult.load(out / "featviz.json")
    assert [u.kind for u in saved.units] == ["unit"] * 3 + ["class"] * 4
    assert saved.metrics == pytest.approx(metrics)
    assert len(saved.top_patches.dataset_index) == 3 and len(saved.top_patches.dataset_index[0]) == 2
    assert saved.layer == "backbone.conv4" and saved.steps == 6 and saved.epoch == 2
    assert set(metrics) == {"activation_gain_min", "activation_gain_median", "activation_final_mean",
                            "activation_vs_data_min"}
    with pytest.raises(ValueError, match="fourier, pixel"):
        FeatureVisualizationCallback(parametrisation="dct")


def test_fit_size_crops_the_centre_or_pads_grey():
    img = torch.arange(2 * 1 * 6 * 6, dtype=torch.float).view(2, 1, 6, 6)
    assert torch.equal(fit_size(img, (4, 4)), img[..., 1:5, 1:5])
    assert torch.equal(fit_size(img, (6, 6)), img)
    big = fit_size(img, (8, 7))
    assert big.shape[-2:] == (8, 7) and torch.equal(big[..., 1:7, 0:6], img) and (big[..., 0, :] == 0.5).all()


def test_visualize_feeds_fixed_geometry_models_their_input_size():
    """A model that only takes 28x28 (like CapsNet's primary-capsule grid) under the standard transforms, which
    change the size (28 + 2*2 - 1 - 1 = 30 before fitting)."""
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 28 * 28, 3)

        def probe_layers(self):
            return {"conv": self.conv}

        def forward(self, x):
            assert x.shape[-2:] == (28, 28), x.shape
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    g = torch.Generator().manual_seed(0)
    assert standard_transforms(28 / 224)(torch.rand(1, 1, 28, 28), g).shape[-1] == 30
    param = PixelImage(2, 1, 28, generator=torch.Generator().manual_seed(0))
    images, info = visualize(Fixed(), channel("conv", [0, 1]), param, standard_transforms(28 / 224), steps=5)
    assert images.shape == (2, 1, 28, 28) and len(info["objective"]) == 5


# ----- a model written outside the repository ---------------------------------------------------------------------
class TinyNet(ClassifierModule):
    """A user's model (issue 12): a ClassifierModule subclass whose probe_layers() are three conv stages and that
    names no default_probe_layer. Chosen with `model._target_=tests.test_featviz.TinyNet`; the other keys of
    conf/model/cnn.yaml are accepted and ignored."""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 64, optimizer=None, scheduler=None,
                 **unused):
        super().__init__(num_classes=num_classes, channels=channels, image_size=image_size, optimizer=optimizer,
                         scheduler=scheduler)
        self.stage1 = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def probe_layers(self):
        return OrderedDict([("stage1", self.stage1), ("stage2", self.stage2), ("stage3", self.stage3)])

    def forward(self, x):
        return self.head(self.stage3(self.stage2(self.stage1(x))).mean((2, 3)))


def test_featviz_on_a_model_without_default_probe_layer_uses_its_last_probe_layer(tmp_path):
    """The reported bug: featviz raised "the model names no default probe layer" at the end of epoch 1."""
    torch.manual_seed(0)
    model = TinyNet(num_classes=4).eval()
    assert not model.default_probe_layer
    cb = FeatureVisualizationCallback(num_units=3, steps=3, k_patches=2, max_images=8, batch_size=4)
    cb.validate(fake_trainer(tmp_path, None), model, SquaresData(n=8, size=32))
    with interpretation_mode(model):
        metrics = cb.run(fake_trainer(tmp_path, SquaresData(n=8, size=32)), model, 0)
    saved = FeatvizResult.load(tmp_path / "interp" / "featviz" / "epoch_000" / "featviz.json")
    assert saved.layer == "stage3" and saved.metrics == pytest.approx(metrics)
    assert [u.index for u in saved.units if u.kind == "unit"] == [0, 1, 2]
    assert saved.top_patches.map_size == [8, 8]  # stage3 of a 32 px input


@pytest.mark.slow
def test_featviz_and_attribution_on_a_user_model_through_train_py(run_train, tmp_path):
    run = tmp_path / "run"
    run_train(["model=cnn", "model._target_=tests.test_featviz.TinyNet", "datamodule.n_train=96",
               "datamodule.n_val=32", "datamodule.n_test=32", "datamodule.batch_size=32", "trainer.max_epochs=1",
               "logger=none", "callbacks=default", "~callbacks.dissection",
               "~callbacks.composability", "~callbacks.decision_tree", "callbacks.featviz.steps=2", "callbacks.featviz.max_images=16",
               "callbacks.attribution.max_images=16", "callbacks.attribution.num_render=2",
               "callbacks.attribution.on_error=raise", "callbacks.featviz.on_error=raise"], run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "completed"
    assert saved["metrics"]["interp/featviz/activation_gain_min"] is not None
    assert saved["metrics"]["interp/attribution/gradcam/pointing_game"] is not None
    assert "interp/attribution/cam/pointing_game" not in saved["metrics"]  # no UnitHead: CAM left out, no error
    assert FeatvizResult.load(run / "interp" / "featviz" / "epoch_000" / "featviz.json").layer == "stage3"


def test_warm_start_with_a_quarter_of_the_steps_keeps_the_quality_of_a_start_from_scratch(tmp_path):
    """Between runs the model trains (a few SGD steps); each epoch the warm-started callback (8 steps from the
    previous images) reaches at least the activations of 32 steps from noise (measured: 2.51 vs 2.19, 2.77 vs 2.42
    for activation_vs_data_min), and the gain stays measured against the noise image."""
    data = SquaresData(n=32, size=32)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = dict(num_units=6, steps=32, k_patches=2, max_images=32, batch_size=16)
    warm = FeatureVisualizationCallback(warm_steps=8, restart_every_n_epochs=3, **kw)
    scratch = FeatureVisualizationCallback(warm_steps=None, **kw)
    items = [data.probe[i] for i in range(32)]
    x, y = torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])
    for epoch in range(3):
        model.train()
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        got = {}
        for name, cb in (("warm", warm), ("scratch", scratch)):
            with interpretation_mode(model):
                got[name] = cb.run(fake_trainer(tmp_path / name, data, epoch), model, epoch)
        steps = FeatvizResult.load(tmp_path / "warm" / "interp" / "featviz" / f"epoch_{epoch:03d}" / "featviz.json")
        if epoch == 0:   # the first run starts from noise: the same computation as from scratch
            assert got["warm"] == pytest.approx(got["scratch"], rel=1e-6) and steps.steps == 32
        elif epoch == 2:  # restart_every_n_epochs=3: epoch index 2 is the 3rd epoch, from noise again
            assert got["warm"] == pytest.approx(got["scratch"], rel=1e-6) and steps.steps == 32
        else:
            assert steps.steps == 8
            for key in ("activation_vs_data_min", "activation_final_mean", "activation_gain_min"):
                assert got["warm"][key] >= got["scratch"][key], (epoch, key, got)
    state = warm.state_dict()
    again = FeatureVisualizationCallback(warm_steps=8, **kw)
    again.load_state_dict(state)
    assert again._warm["key"] == warm._warm["key"]
    with pytest.raises(ConfigError, match="callbacks.featviz.warm_steps"):
        FeatureVisualizationCallback(warm_steps=0)


def test_unit_sheet_puts_every_image_at_its_box_unchanged(tmp_path):
    """Each unit's visualisation and each of its patches appear in the sheet pixel for pixel (nearest upscaling to
    the cell), at the boxes the function reports, with the units in `columns` columns."""
    import numpy as np
    from PIL import Image
    from algorithms.featviz import save_unit_sheet
    g = torch.Generator().manual_seed(0)
    vis, patches = torch.rand(5, 3, 16, 16, generator=g), torch.rand(5, 3, 3, 8, 8, generator=g)
    boxes = save_unit_sheet(vis, patches, tmp_path / "s.png", [f"unit {u}\nline two" for u in range(5)],
                            [[f"#{j}" for j in range(3)] for _ in range(5)], title="t", cell=32, columns=2)
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    side = boxes["cell"]

    def at(xy):
        return sheet[xy[1]:xy[1] + side, xy[0]:xy[0] + side]

    def expect(img, scale):
        return (img.permute(1, 2, 0) * 255).round().byte().numpy().repeat(scale, 0).repeat(scale, 1)

    for u in range(5):
        assert (at(boxes["vis"][u]) == expect(vis[u], 2)).all(), u
        for j in range(3):
            assert (at(boxes["patches"][u][j]) == expect(patches[u, j], 4)).all(), (u, j)
    xs = sorted({b[0] for b in boxes["vis"]})
    assert len(xs) == 2 and [b[1] for b in boxes["vis"]][::2] == sorted({b[1] for b in boxes["vis"]})


def test_unit_labels_name_the_unit_its_concept_activation_and_prototype_class():
    from algorithms.featviz import FeatvizUnit, unit_label
    u = FeatvizUnit(kind="unit", index=3, initial=0.25, final=4.0, data_mean=2.0)
    assert unit_label(u, "mean") == "unit 3\nmean 4.00 (start 0.25)\n2.0x its data mean"
    assert unit_label(u, "max", concept="red (IoU 0.21)", owner="red-circle") == \
        "prototype 3\nclass red-circle\nred (IoU 0.21)\nmax 4.00 (start 0.25)\n2.0x its data mean"


def test_unit_sheet_labels_come_from_this_epochs_dissection_of_the_layer():
    """The concept of each unit is the dissection callback's own result for this epoch and layer (nothing is
    computed for the figure); another epoch or layer gives no concept."""
    from callbacks.dissection import DissectionCallback
    from tests.test_composability import labelled
    dissection = DissectionCallback()
    result = labelled([1, 0, 3, 4])
    result.intersection[3, 4] = 2.0   # 2 / (30 + 30 - 2) = 0.034, below the 0.04 of an interpretable unit
    dissection.results, dissection.results_epoch = {"backbone.conv4": result}, 4
    trainer = SimpleNamespace(callbacks=[dissection])
    cb = FeatureVisualizationCallback()
    assert cb._concepts(trainer, "backbone.conv4", 4) == {0: "circle (IoU 0.50)", 2: "red (IoU 0.50)",
                                                          3: "green (IoU 0.03 < 0.04)"}
    assert cb._concepts(trainer, "backbone.conv4", 5) == {} and cb._concepts(trainer, "backbone.conv3", 4) == {}
