"""icnn metrics: hand-computed values for location instability and part interpretability, the callback against the
plain functions, files written, and 2-process DDP equal to one process."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from algorithms.icnn_metrics import (ICNNMetricsResult, activation_thresholds, bilinear_upsample, layer_maps, location_instability,
                                     part_interpretability, part_iou_hits, part_masks, peak_positions,
                                     receptive_field_centres)
from callbacks.icnn_metrics import ICNNMetricsCallback

NAN = float("nan")


def test_receptive_field_centres_by_hand():
    xy = receptive_field_centres(torch.tensor([0, 19, 63]), (8, 8), (64, 64))
    # pixel-index coordinates: unit (2, 3) of an 8x8 map over 64 px covers rows 16..23, columns 24..31
    assert xy.tolist() == [[3.5, 3.5], [27.5, 19.5], [59.5, 59.5]]   # index 19 = row 2, column 3
    assert receptive_field_centres(torch.tensor([5]), (2, 4), (20, 40)).tolist() == [[14.5, 14.5]]


def _instability_case():
    peak_values = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])            # filter 1 never fires
    peak_xy = torch.zeros(3, 2, 2)
    peak_xy[1, 0] = torch.tensor([100.0, 100.0])
    landmarks = torch.tensor([[[3.0, 4.0], [NAN, NAN]],           # image 0: d0 = 5, part 1 absent
                              [[100.0, 107.5], [100.0, 103.0]],   # image 1: d0 = 7.5, d1 = 3
                              [[6.0, 8.0], [0.0, 5.0]]])          # image 2: d0 = 10, d1 = 5
    return peak_values, peak_xy, landmarks


def test_location_instability_by_hand():
    peak_values, peak_xy, landmarks = _instability_case()
    # top 2 of filter 0 = images 0 and 2: landmark 0 distances (5, 10) -> population std 2.5; landmark 1 seen once
    # -> undefined; divided by the diagonal of a 30 x 40 image (50)
    r = location_instability(peak_values, peak_xy, landmarks, (30, 40), top_k=2)
    assert r["top_index"][0].tolist() == [0, 2]
    assert r["per_filter"][0].item() == pytest.approx(2.5 / 50)
    assert math.isnan(r["per_filter"][1].item())                  # a silent filter has no peak, so no value
    assert r["score"].item() == pytest.approx(0.05)
    # top 3: landmark 0 distances (5, 7.5, 10): std sqrt(25/6); landmark 1 distances (3, 5): std 1
    r = location_instability(peak_values, peak_xy, landmarks, (30, 40), top_k=3)
    assert r["score"].item() == pytest.approx((math.sqrt(25 / 6) + 1.0) / 2 / 50)


def test_location_instability_is_nan_when_nothing_fires():
    r = location_instability(torch.zeros(4, 2), torch.zeros(4, 2, 2), torch.zeros(4, 1, 2), (10, 10), 3)
    assert math.isnan(r["score"].item())


def _part_case():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 0, :2, :2] = 1.0          # filter 0, image 0: top-left 2x2
    maps[1, 0, 3, 3] = 1.0            # filter 0, image 1: one bottom-right pixel
    maps[0, 1, 2:, 2:] = 1.0          # filter 1, image 0: bottom-right 2x2; image 1: silent
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :3] = True        # part 0 only in image 0: top-left 2x3
    masks[0, 1, 2:, 2:] = True        # part 1 in both images: bottom-right 2x2
    masks[1, 1, 2:, 2:] = True
    return maps, masks


def test_part_interpretability_by_hand():
    maps, masks = _part_case()
    hits, present = part_iou_hits(maps, torch.tensor([0.5, 0.5]), masks, 0.2)
    # filter 0: image 0 part 0 IoU 4/6 (hit), image 1 part 1 IoU 1/4 = 0.25 (hit); filter 1: image 0 part 1 IoU 1
    assert present.tolist() == [1, 2]
    assert hits.tolist() == [[1, 1], [0, 1]]
    r = part_interpretability(hits, present)
    assert r["per_filter"].tolist() == [1.0, 0.5]
    assert r["best_part"].tolist() == [0, 1]
    assert r["score"].item() == pytest.approx(0.75)
    # IoU 0.25 is not above 0.3
    hits, _ = part_iou_hits(maps, torch.tensor([0.5, 0.5]), masks, 0.3)
    assert hits.tolist() == [[1, 0], [0, 1]]


def test_thresholds_are_the_top_half_percent_quantile():
    maps = torch.arange(200.0).view(2, 1, 10, 10)
    assert activation_thresholds(maps, 0.995).item() == pytest.approx(198.005)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(7, 3, 5, 5, generator=g)
    expected = torch.quantile(maps.transpose(0, 1).reshape(3, -1), 0.995, dim=1)
    torch.testing.assert_close(activation_thresholds(maps, 0.995), expected)


def test_separable_upsampling_equals_bilinear_interpolation():
    g = torch.Generator().manual_seed(0)
    for shape, size in (((2, 3, 8, 8), (64, 64)), ((1, 2, 7, 5), (16, 12)), ((1, 1, 4, 4), (4, 4))):
        maps = torch.rand(*shape, generator=g)
        expected = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(bilinear_upsample(maps, size), expected)


def test_part_masks_from_several_segmentation_maps():
    seg = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    seg[0, 0, 0, 0] = 7
    seg[0, 1, 1, 1] = 9
    seg[0, 1, 0, 0] = 9
    m = part_masks(seg, torch.tensor([9, 7, 4]))
    assert m[0, 0].tolist() == [[True, False], [False, True]]
    assert m[0, 1].tolist() == [[True, False], [False, False]] and not m[0, 2].any()


# ----- the callback on a small synthetic probe set -------------------------------------------------------------
class SquaresProbe(Dataset):
    """16x16 grey images with a bright 4x4 square (part 'square', concept 3) and, on even images, a dim 2x6 bar
    (part 'bar', concept 4); landmarks at the parts' centres (NaN when absent)."""
    part_names = ["square", "bar"]
    part_concept_ids = [3, 4]

    def __init__(self, n=22):
        g = torch.Generator().manual_seed(7)
        self.pos = torch.randint(0, 12, (n, 2), generator=g)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raw = torch.full((1, 16, 16), 0.1)
        seg = torch.zeros(1, 16, 16, dtype=torch.long)
        r, c = self.pos[i].tolist()
        raw[0, r:r + 4, c:c + 4] = 1.0
        seg[0, r:r + 4, c:c + 4] = 3
        landmarks = torch.tensor([[c + 1.5, r + 1.5], [NAN, NAN]])
        if i % 2 == 0:
            br = 0 if r >= 8 else 14
            raw[0, br:br + 2, 5:11] = 0.5
            seg[0, br:br + 2, 5:11] = 4
            landmarks[1] = torch.tensor([7.5, br + 0.5])
        return {"image": (raw - 0.5) / 0.5, "raw": raw, "label": i % 2, "seg": seg, "landmarks": landmarks,
                "index": i}


class FakeDataModule:
    def __init__(self, n=22):
        self.ds = SquaresProbe(n)

    def probe_dataset(self, split="val"):
        return self.ds


def _model():
    from models.icnn import ICNNClassifier
    torch.manual_seed(0)
    return ICNNClassifier(2, channels=1, image_size=16, widths=(4, 8), filters=6).eval()


def _stub_trainer(root, dm):
    return SimpleNamespace(default_root_dir=str(root), datamodule=dm, loggers=[], global_step=0, current_epoch=0)


def test_callback_equals_the_plain_functions_and_writes_its_files(tmp_path):
    model, dm = _model(), FakeDataModule()
    cb = ICNNMetricsCallback(top_k=5, batch_size=8, figure_filters=3, figure_images=4)
    assert cb.applies_to(model)
    metrics = cb.execute(_stub_trainer(tmp_path, dm), model)

    ds = dm.ds
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    maps = layer_maps(model, model.get_probe_layer(), images)
    assert maps.shape == (len(ds), 6, 8, 8)
    values, index = peak_positions(maps)
    landmarks = torch.stack([ds[i]["landmarks"] for i in range(len(ds))])
    inst = location_instability(values, receptive_field_centres(index, (8, 8), (16, 16)), landmarks, (16, 16), 5)
    seg = torch.stack([ds[i]["seg"] for i in range(len(ds))])
    hits, present = part_iou_hits(maps, activation_thresholds(maps), part_masks(seg, torch.tensor([3, 4])))
    assert present.tolist() == [22, 11]
    parts = part_interpretability(hits, present)
    assert metrics["interp/icnn/location_instability"] == pytest.approx(inst["score"].item())
    assert metrics["interp/icnn/part_interpretability"] == pytest.approx(parts["score"].item())
    assert 0 < metrics["interp/icnn/live_filters"] <= 1

    out = tmp_path / "interp" / "icnn" / "epoch_000"
    saved = ICNNMetricsResult.load(out / "icnn_metrics.json")
    assert saved.layer == "icnn.filters1" and len(saved.filters) == 6
    assert saved.filters[0]["best_part"] in ("square", "bar") and saved.filters[0]["class"] in (0, 1)
    assert saved.metrics == {k.removeprefix("interp/icnn/"): v for k, v in metrics.items() if "seconds" not in k}
    assert (out / "filter_peaks.png").stat().st_size > 1000


def test_callback_applies_to_other_models_only_when_asked():
    from models.cnn import CNNClassifier
    cnn = CNNClassifier(2, channels=1, image_size=16, widths=(4, 8))
    assert not ICNNMetricsCallback().applies_to(cnn)
    assert ICNNMetricsCallback(all_models=True, layer="backbone.conv2").applies_to(cnn)


def test_callback_skips_data_without_parts(tmp_path):
    dm = SimpleNamespace(probe_dataset=lambda split="val": None)
    assert ICNNMetricsCallback().execute(_stub_trainer(tmp_path, dm), _model()) == {}


def _metrics_in_process(rank, world_size, root):
    model, dm = _model(), FakeDataModule(n=13)   # uneven shards: 7 + 6 images
    # top_k = all images: which of two near-equal peaks ranks higher may change in the last bit between batch sizes
    cb = ICNNMetricsCallback(top_k=13, batch_size=4, figure_filters=2, figure_images=2)
    return cb.run(_stub_trainer(root, dm), model, 0)


@pytest.mark.ddp
def test_two_process_metrics_equal_one_process(tmp_path):
    from tests.ddp_utils import run_ddp
    single = _metrics_in_process(0, 1, tmp_path / "single")
    results = run_ddp(_metrics_in_process, 2, args=(str(tmp_path / "ddp"),))
    for r in results:
        assert r.keys() == single.keys()
        for k in single:
            assert r[k] == pytest.approx(single[k], rel=1e-5, abs=1e-8), k
    assert (tmp_path / "ddp" / "interp" / "icnn" / "epoch_000" / "icnn_metrics.json").is_file()
