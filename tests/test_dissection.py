"""Network dissection: exact thresholds, IoUs against a brute-force loop, DDP == single process, callback safety and
bad input. Synthetic in-memory probe sets; the quality test on shapes lives in test_dissection_quality.py."""
from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from algorithms.dissection import (DissectionError, DissectionResult, concept_masks, dissect, exact_quantile,
                                   iou_statistics, open_broden, quantile_from_top, threshold_rank)
from callbacks.base import InterpretationError
from callbacks.dissection import DissectionCallback
from core.errors import ConfigError
from tests.ddp_utils import run_ddp


# ----- a hand-made Broden-format probe set ---------------------------------------------------------------------------

class ToyProbe(Dataset):
    """n images of size x size; map 0 holds objects 1-3, map 1 holds parts 4-5 (often unlabelled); concept 6 is an
    image-level scene label on every third image, and concept 2 is also pixel-labelled in some of those images (the
    image label must win, not double count)."""
    concept_names = ["-", "circle", "square", "cross", "top", "bottom", "night"]
    concept_categories = ["", "object", "object", "object", "part", "part", "scene"]
    category_names = ["object", "part", "scene"]

    def __init__(self, n=10, size=8, seed=0, channels=3):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, channels, size, size, generator=g)
        seg0 = torch.randint(0, 4, (n, size, size), generator=g)
        seg1 = torch.randint(0, 6, (n, size, size), generator=g)
        seg1[(seg1 > 0) & (seg1 < 4)] = 0
        self.seg = torch.stack([seg0, seg1], 1)
        self.image_labels = torch.zeros(n, 7, dtype=torch.bool)
        self.image_labels[::3, 6] = True
        self.num_concepts = 6
        self.seg_size = (size, size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "raw": self.images[i], "label": torch.tensor(i % 3), "seg": self.seg[i],
                "image_labels": self.image_labels[i], "index": torch.tensor(i)}


class ToyNet(nn.Sequential):
    """A bare nn.Module that offers the probe layers of core/protocol.py: its children by name."""

    def probe_layers(self):
        return OrderedDict(self.named_children())


def toy_net(seed=0, units=5):
    torch.manual_seed(seed)
    return ToyNet(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, units, 3, stride=2, padding=1),
                  nn.Flatten(), nn.Identity())


# ----- brute force --------------------------------------------------------------------------------------------------

def bilinear_by_hand(a, out_h, out_w):
    """align_corners=False bilinear upsampling written out (the reference the vectorised path must equal)."""
    h, w = a.shape
    out = torch.zeros(out_h, out_w, dtype=torch.float64)
    for y in range(out_h):
        sy = max((y + 0.5) * h / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for x in range(out_w):
            sx = max((x + 0.5) * w / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            out[y, x] = ((1 - fy) * ((1 - fx) * a[y0, x0] + fx * a[y0, x1])
                         + fy * ((1 - fx) * a[y1, x0] + fx * a[y1, x1]))
    return out


def brute_force_iou(acts, thresholds, seg, image_labels, num_concepts):
    """Loops over images, units, concepts and pixels."""
    b, u, h, w = acts.shape
    sh, sw = seg.shape[-2:]
    inter = torch.zeros(u, num_concepts + 1, dtype=torch.float64)
    union = torch.zeros(u, num_concepts + 1, dtype=torch.float64)
    for i in range(b):
        for k in range(u):
            up = bilinear_by_hand(acts[i, k].double(), sh, sw)
            for c in range(1, num_concepts + 1):
                for y in range(sh):
                    for x in range(sw):
                        m = bool(up[y, x] > thresholds[k])
                        lab = bool(image_labels[i, c]) or any(int(seg[i, l, y, x]) == c for l in range(seg.shape[1]))
                        inter[k, c] += m and lab
                        union[k, c] += m or lab
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
    return inter, union, iou


# ----- thresholds ---------------------------------------------------------------------------------------------------

# torch.quantile interpolates with lerp, whose vectorised CPU kernel may round the last bit differently from a
# scalar lerp of the same two values, so equality is to float32 rounding; the order statistics are the same.
def assert_same_quantile(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 3, 2, 2), (20, 4, 5, 5), (3, 2, 7, 7), (1, 1, 1, 3), (300, 2, 8, 8)])
def test_threshold_equals_torch_quantile(shape):
    acts = torch.randn(*shape) * 3
    flat = acts.transpose(0, 1).reshape(shape[1], -1)
    want = torch.quantile(flat, 0.995, dim=1)
    got = exact_quantile(acts)
    assert_same_quantile(got, want)
    lo, hi, _, _ = threshold_rank(flat.shape[1])
    s = flat.sort(dim=1).values
    assert bool((s[:, lo] <= got).all() and (got <= s[:, hi]).all())


def test_threshold_with_ties_and_other_quantiles():
    acts = torch.randint(0, 4, (50, 3, 4, 4)).float()  # heavy ties: exact equality
    for q in (0.005, 0.01, 0.2):
        want = torch.quantile(acts.transpose(0, 1).reshape(3, -1), 1 - q, dim=1)
        assert torch.equal(exact_quantile(acts, q), want)


def test_threshold_rank_definition():
    # n = 1000 values: rank 0.995 * 999 = 994.005 -> interpolate ascending 994 and 995; k = 1000 - 994 = 6
    lo, hi, weight, k = threshold_rank(1000)
    assert (lo, hi, k) == (994, 995, 6) and weight == pytest.approx(0.005, abs=1e-4)
    top = torch.arange(999, -1, -1.0)[None, :k]  # values 0..999, top 6 descending
    assert float(quantile_from_top(top, 1000)) == pytest.approx(994.005, abs=1e-3)


# ----- IoU ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2])
def test_iou_equals_brute_force(seed):
    torch.manual_seed(seed)
    probe = ToyProbe(n=4, size=6, seed=seed)
    acts = torch.rand(4, 3, 3, 3)
    thresholds = torch.tensor([0.5, 0.7, 0.3])
    inter, unit_area, concept_area = iou_statistics(acts, thresholds, probe.seg, probe.image_labels, 6)
    want_inter, want_union, _ = brute_force_iou(acts, thresholds, probe.seg, probe.image_labels, 6)
    union = unit_area[:, None] + concept_area[None, :] - inter
    assert torch.equal(inter[:, 1:], want_inter[:, 1:])
    assert torch.equal(union[:, 1:], want_union[:, 1:])
    assert probe.image_labels[0, 6] and (probe.seg[0] == 2).any()  # the image-label-wins case is exercised


def test_dissect_end_to_end_equals_brute_force():
    probe = ToyProbe(n=9, size=8)
    net = toy_net()
    loader = DataLoader(probe, batch_size=4)
    res = dissect(net, ["2"], loader, top_n=3)["2"]
    acts = net[:3](probe.images).detach()
    flat = acts.transpose(0, 1).reshape(acts.shape[1], -1)
    assert_same_quantile(res.thresholds, torch.quantile(flat, 0.995, dim=1))
    _, _, iou = brute_force_iou(acts, res.thresholds, probe.seg, probe.image_labels, 6)
    assert torch.allclose(res.iou[:, 1:], iou[:, 1:], atol=1e-12)
    # top images: the highest max-activation images per unit
    want = acts.amax(dim=(2, 3)).t().topk(3, dim=1).indices
    assert torch.equal(res.top_images, want)
    best_c, best_s = res.best
    assert torch.equal(best_s, iou[:, 1:].max(1).values)
    rows = res.labels()
    assert [r["unit"] for r in rows] == list(range(1, 6)) and rows[0]["label"] == probe.concept_names[int(best_c[0])]


def test_summary_counts_and_unique_concepts():
    probe = ToyProbe(n=3)
    res = dissect(toy_net(), ["2"], DataLoader(probe, batch_size=3))["2"]
    # hand-set counts: unit 0 -> circle (0.5), unit 1 -> circle (0.05), unit 2 -> top (0.04), 3 -> 0.039, 4 -> none
    res.intersection = torch.zeros(5, 7, dtype=torch.float64)
    res.unit_area = torch.full((5,), 52.0, dtype=torch.float64)
    res.concept_area = torch.full((7,), 52.0, dtype=torch.float64)
    for u, c, i in [(0, 1, 34.0), (1, 1, 6.0), (2, 4, 4.0), (3, 6, 3.9)]:
        res.intersection[u, c] = i  # IoU = i / (104 - i): 0.486, 0.061, 0.04 exactly, 0.0390
    s = res.summary()
    assert s["interpretable_units"] == 3 and s["unique_concepts"] == 2
    assert s["category/object"] == 2 and s["category/part"] == 1 and s["category/scene"] == 0
    assert res.unit_labels() == ["circle", "circle", "top", None, None]


def test_concept_masks_image_label_is_full_image():
    seg = torch.tensor([[[[1, 0], [0, 2]]]])
    labels = torch.tensor([[False, False, False, True]])
    m = concept_masks(seg, labels, 3)
    assert m[0, 1].tolist() == [1, 0, 0, 0] and m[0, 3].tolist() == [1, 1, 1, 1] and m[0, 0].sum() == 0


# ----- DDP == single process (one 2-process launch for all DDP checks: spawning costs more than the checks) -------

def _ddp_dissect(rank, world_size, n):
    from core import distributed as D
    probe = ToyProbe(n=n, size=8)
    shard = Subset(probe, D.shard_indices(len(probe)))
    res = dissect(toy_net(), ["0", "2"], DataLoader(shard, batch_size=3), top_n=4)
    return {k: (r.thresholds, r.iou, r.top_images, r.unit_area, r.concept_vectors()) for k, r in res.items()}


def _ddp_compose(rank, world_size, n):
    from algorithms.composability import compose
    from core import distributed as D
    probe = ToyProbe(n=n, size=16)
    model = small_cnn().eval()
    loader = DataLoader(Subset(probe, D.shard_indices(len(probe))), batch_size=3)
    labels = dissect(model, None, loader, top_n=2)["backbone.conv4"]
    return compose(model, loader, labels, ibd_terms=2).to_json()


def _ddp_checks(rank, world_size, tmp):
    # n=1: rank 1 has an empty shard and must still take part in every collective
    return {"dissect": {n: _ddp_dissect(rank, world_size, n) for n in (11, 1)},
            "compose": {n: _ddp_compose(rank, world_size, n) for n in (11, 1)},
            "failure": _ddp_failing_callback(rank, world_size, tmp)}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_ddp(_ddp_checks, 2, (str(tmp_path_factory.mktemp("ddp")),), timeout_s=120)


@pytest.mark.ddp
@pytest.mark.parametrize("n", [11, 1])
def test_ddp_equals_single_process(n, ddp_results):
    single = _ddp_dissect(0, 1, n)
    for out in ddp_results:
        for layer, (t, iou, top, area, q) in single.items():
            t2, iou2, top2, area2, q2 = out["dissect"][n][layer]
            assert torch.allclose(t, t2, atol=1e-6, rtol=0)
            assert torch.allclose(iou, iou2, atol=1e-6, rtol=0)
            assert torch.equal(area, area2)
            assert torch.allclose(q, q2, atol=1e-6)
            if n > 1:
                assert torch.equal(top[:, : min(4, n)], top2[:, : min(4, n)])
        # composability on the same shards (rank 1's shard is empty for n=1: the head's shape from the first item)
        want, got = _ddp_compose(0, 1, n), out["compose"][n]
        assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-9)
        assert [c["num_images"] for c in got["classes"]] == [c["num_images"] for c in want["classes"]]
        for c_got, c_want in zip(got["classes"], want["classes"]):
            assert list(c_got["concept_shares"]) == list(c_want["concept_shares"])
            assert c_got["concept_shares"] == pytest.approx(c_want["concept_shares"], abs=1e-9)


# ----- the callback -------------------------------------------------------------------------------------------------

def small_cnn(num_classes=3):
    from models.cnn import CNNClassifier
    torch.manual_seed(0)
    return CNNClassifier(num_classes=num_classes, channels=3, image_size=16, widths=(4, 8, 8, 8))


class ToyDataModule:
    def __init__(self, probe):
        self._probe = probe
        self.image_size, self.mean, self.std = 16, (0.5,) * 3, (0.25,) * 3

    def probe_dataset(self, split="val"):
        return self._probe


def fake_trainer(tmp_path, dm, epoch=0, max_epochs=1):
    return SimpleNamespace(datamodule=dm, default_root_dir=str(tmp_path), current_epoch=epoch, max_epochs=max_epochs,
                           loggers=[], global_step=0, sanity_checking=False)


def all_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_callback_leaves_training_state_untouched_and_writes_outputs(tmp_path):
    model = small_cnn()
    model.train()
    model.backbone.stages[0].eval()  # a mixed state must come back as it was
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)} for k, s in opt.state.items()}
    modes = {n: m.training for n, m in model.named_modules()}
    cb = DissectionCallback(layers=["backbone.conv2", "backbone.conv4"], probe_size=8, gallery_units=2, top_images=2)
    metrics = cb.execute(fake_trainer(tmp_path, ToyDataModule(ToyProbe(n=12, size=16))), model)
    assert {n: p.grad for n, p in model.named_parameters()}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(opt.state[k][n], v) for k, s in state.items() for n, v in s.items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all_hooks(model) == 0
    out = tmp_path / "interp" / "dissection" / "epoch_000"
    for f in ("dissection.json", "backbone.conv4.csv", "backbone.conv4_summary.png", "backbone.conv4_gallery.png"):
        assert (out / f).is_file(), f
    header = (out / "backbone.conv4.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["unit", "category", "label", "score"] and "object-iou" in header
    assert "interp/dissection/interpretable_units" in metrics
    assert "interp/dissection/backbone.conv2/unique_concepts" in metrics
    assert cb.results["backbone.conv4"].num_images == 8


def test_callback_removes_hooks_when_an_error_is_raised(tmp_path):
    model = small_cnn()

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")
    model.backbone.stages.conv3.append(Boom())
    cb = DissectionCallback(layers=["backbone.conv2", "backbone.conv4"], probe_size=4, on_error="raise")
    with pytest.raises(InterpretationError, match="boom"):
        cb.execute(fake_trainer(tmp_path, ToyDataModule(ToyProbe(n=4, size=16))), model)
    assert all_hooks(model) == 0


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ConfigError, match="layers: 'backbone.nope'.*backbone.conv1.*backbone.conv4"):
        dissect(small_cnn(), ["backbone.nope"], DataLoader(ToyProbe(n=2, size=16)))


def test_non_spatial_layer_is_an_error():
    model = small_cnn()
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.forward = lambda x: model.pool(model.backbone(x))
    model.probe_layers = lambda: {"pool": model.pool}
    with pytest.raises(DissectionError, match="non-spatial"):
        dissect(model, ["pool"], DataLoader(ToyProbe(n=2, size=16)))
    assert all_hooks(model) == 0


def test_folder_that_is_not_broden(tmp_path):
    (tmp_path / "index.csv").write_text("image,split\n")
    with pytest.raises(DissectionError, match="label.csv, category.csv, images missing"):
        open_broden(tmp_path)
    with pytest.raises(DissectionError, match="no such folder"):
        open_broden(tmp_path / "nope")
    cb = DissectionCallback(probe=str(tmp_path), on_error="raise")
    with pytest.raises(InterpretationError, match="not a Broden folder"):
        cb.execute(fake_trainer(tmp_path, ToyDataModule(None)), small_cnn())


def test_probe_without_concepts_is_an_error_and_missing_probe_is_skipped(tmp_path):
    class NotBroden(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16), 0
    cb = DissectionCallback(on_error="raise")
    with pytest.raises(InterpretationError, match="lacks concept_names"):
        cb.execute(fake_trainer(tmp_path, ToyDataModule(NotBroden())), small_cnn())
    assert DissectionCallback().execute(fake_trainer(tmp_path, ToyDataModule(None)), small_cnn()) == {}


class CorruptProbe(ToyProbe):
    def __getitem__(self, i):
        if i == 6:  # in rank 1's shard only: rank 1 fails mid-way while rank 0 is about to enter a collective
            raise ValueError("corrupt item 6")
        return super().__getitem__(i)


def _ddp_failing_callback(rank, world_size, tmp):
    cb = DissectionCallback(probe_size=8, gallery_units=0, on_error="raise")
    try:
        cb.execute(fake_trainer(f"{tmp}/r{rank}", ToyDataModule(CorruptProbe(n=8, size=16))), small_cnn())
    except InterpretationError as err:
        return str(err)
    return "no error"


@pytest.mark.ddp
def test_callback_error_fails_every_rank(ddp_results):
    # both ranks stop, and both name the rank that failed and its error (rank 0 only saw its peer stop)
    for message in (r["failure"] for r in ddp_results):
        assert "failed on rank 1" in message and "corrupt item 6" in message, message


# ----- typed result -------------------------------------------------------------------------------------------------

def test_dissection_result_round_trips_through_json(tmp_path):
    from algorithms.dissection import DissectionEpoch
    probe = ToyProbe(n=3, size=8)
    results = dissect(toy_net(), ["0", "2"], DataLoader(probe, batch_size=2), top_n=5)  # 3 images: padded top lists
    res = results["2"]
    assert res.top_images[:, 3:].eq(-1).all() and torch.isinf(res.top_scores[:, 3:]).all()
    data = res.to_json()
    assert data["schema"] == "dissection" and data["intersection"]["layout"] == "coo"
    assert len(data["intersection"]["index"]) == int((res.intersection != 0).sum())
    again = DissectionResult.from_json(data)
    assert again == res
    assert torch.equal(again.thresholds, res.thresholds) and torch.equal(again.iou, res.iou)
    assert again.labels() == res.labels() and again.summary() == res.summary()
    assert torch.equal(again.top_images, res.top_images) and torch.equal(again.top_scores, res.top_scores)
    assert torch.equal(again.concept_vectors(), res.concept_vectors())
    epoch = DissectionEpoch(results, 4)
    loaded = DissectionEpoch.load(epoch.save(tmp_path / "dissection.json"))
    assert loaded.epoch == 4 and list(loaded.layers) == ["0", "2"] and loaded["0"] == results["0"]
    from core.results import SchemaError
    with pytest.raises(SchemaError, match="not 'dissection'"):
        DissectionResult.load(tmp_path / "dissection.json")


# ----- settings checked before training -----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("quantile", 0.0), ("quantile", 1.0), ("iou_threshold", 1.5),
                                       ("probe_size", 0), ("top_images", 0), ("render_every_n_epochs", 0),
                                       ("cache_mb", -1)])
def test_bad_settings_are_rejected_when_built(key, value):
    with pytest.raises(ConfigError, match=f"callbacks.dissection.{key}"):
        DissectionCallback(**{key: value})


def test_settings_that_do_not_fit_the_model_or_data_fail_in_setup(tmp_path):
    model = small_cnn()

    def setup(cb, dm):
        trainer = fake_trainer(tmp_path, dm)
        trainer.callbacks = [cb]
        cb.setup(trainer, model, "fit")
        return cb
    with pytest.raises(ConfigError, match=r"callbacks.dissection.layers: 'nope'.*valid: backbone.conv1"):
        setup(DissectionCallback(layers=["nope"]), ToyDataModule(ToyProbe(n=2, size=16)))
    (tmp_path / "index.csv").write_text("image,split\n")
    with pytest.raises(DissectionError, match="callbacks.dissection.probe=.* is not a Broden folder"):
        setup(DissectionCallback(probe=str(tmp_path)), ToyDataModule(None))
    with pytest.raises(DissectionError, match=r"cannot run on the probe images \(1 channels.*3 channels"):
        setup(DissectionCallback(), ToyDataModule(ToyProbe(n=2, size=16, channels=1)))
    assert setup(DissectionCallback(), ToyDataModule(ToyProbe(n=2, size=16))).active


class TinyData:
    """A LightningDataModule with random training images and, optionally, a concept probe set."""

    def __new__(cls, probe=None):
        import pytorch_lightning as pl
        from torch.utils.data import TensorDataset

        class _Data(pl.LightningDataModule):
            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.data = TensorDataset(torch.rand(8, 3, 16, 16, generator=g), torch.arange(8) % 3)
                self.class_names = ["a", "b", "c"]

            def train_dataloader(self):
                return DataLoader(self.data, batch_size=4)

            def probe_dataset(self, split="val"):
                return probe
        return _Data()


def fit(tmp_path, callbacks, dm, batches: list):
    """trainer.fit of small_cnn for one epoch; `batches` collects the index of every training batch that starts."""
    import pytorch_lightning as pl

    class Batches(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append(batch_idx)
    trainer = pl.Trainer(max_epochs=1, callbacks=[*callbacks, Batches()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         accelerator="cpu", devices=1)
    trainer.fit(small_cnn(), datamodule=dm)
    return trainer


def test_an_unknown_layer_fails_in_fit_before_the_first_training_batch(tmp_path):
    from callbacks.composability import ComposabilityCallback
    batches = []
    with pytest.raises(ConfigError, match=r"callbacks.dissection.layers: 'nope'.*backbone.conv4"):
        fit(tmp_path, [ComposabilityCallback(), DissectionCallback(layers=["nope"])], TinyData(ToyProbe(n=4, size=16)),
            batches)
    assert batches == []
    # the same set-up with a valid layer trains and dissects
    trainer = fit(tmp_path, [DissectionCallback(probe_size=4, gallery_units=0)], TinyData(ToyProbe(n=4, size=16)),
                  batches)
    assert batches == [0, 1] and "interp/dissection/interpretable_units" in trainer.callbacks[0].last_metrics


def test_data_without_a_probe_set_trains_with_dissection_switched_off(tmp_path):
    from callbacks.composability import ComposabilityCallback
    batches = []
    trainer = fit(tmp_path, [DissectionCallback(), ComposabilityCallback()], TinyData(None), batches)
    assert batches == [0, 1] and trainer.current_epoch == 1
    assert all(not cb.active and not cb.last_metrics and not cb.errors for cb in trainer.callbacks[:2])


@pytest.mark.slow
def test_a_bad_layer_in_the_config_fails_train_before_any_step(run_train, tmp_path):
    import json
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"callbacks.dissection.layers: 'nope'"):
        run_train(["model=cnn", "logger=none", "trainer.max_epochs=1", "datamodule.n_train=60", "datamodule.n_val=30",
                   "datamodule.n_test=30", "callbacks.dissection.layers=[nope]"], out)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed" and record["global_step"] == 0
    assert "callbacks.dissection.layers" in record["error"]
