"""The generated shapes set: determinism, splits, class/concept consistency, landmarks, caching, speed, errors."""
import csv
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import shapes_render
from datamodules.errors import DataError
from datamodules.shapes import ShapesDataModule, dataset_folder, generate_folder

torch.set_num_threads(1)
SMALL = dict(n_train=96, n_val=36, n_test=36)


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    dm = ShapesDataModule(tmp_path_factory.mktemp("shapes"), batch_size=16, **SMALL)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def probe_items(dm):
    return {split: list(dm.probe_dataset(split)) for split in ("train", "val", "test")}


def _files(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "generation.json" and not p.name.startswith("decoded_")}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    params = dict(seed=3, image_size=32, mask_size=None, distractor_prob=0.7, n_train=12, n_val=6, n_test=6)
    generate_folder(tmp_path / "a", params)
    generate_folder(tmp_path / "b", params)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 24 * 5 + 10 and a == b  # 5 PNGs per image + tables
    generate_folder(tmp_path / "c", {**params, "seed": 4})
    c = _files(tmp_path / "c")
    assert c.keys() == a.keys()
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 100
    # the cache folder name depends on every generation parameter
    assert dataset_folder(tmp_path, params) != dataset_folder(tmp_path, {**params, "seed": 4})
    assert dataset_folder(tmp_path, params) != dataset_folder(tmp_path, {**params, "n_val": 7})


def test_splits_sizes_and_disjoint(dm):
    rows = list(csv.DictReader(open(dm.folder / "index.csv")))
    by_split = {s: {r["image"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 96, "val": 36, "test": 36}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert [len(dm.vis_dataset(s)) for s in ("train", "val", "test")] == [96, 36, 36]
    # classes interleave, so every split is balanced
    for s in ("train", "val", "test"):
        counts = np.bincount(dm.vis_dataset(s).labels.numpy(), minlength=12)
        assert counts.min() == counts.max()
    assert dm.num_classes == 12 and dm.channels == 3 and dm.image_size == 64
    assert dm.class_names[:3] == ["red-circle", "green-circle", "blue-circle"]


def test_loaders_normalisation_and_push_index(dm):
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.long
    vis = dm.vis_dataset("val")
    raw = torch.stack([vis[i][0] for i in range(16)])
    assert torch.allclose(dm.denormalize(x), raw, atol=1e-6)
    assert torch.allclose(dm.normalize(raw), x, atol=1e-6)
    assert 0 <= raw.min() and raw.max() <= 1
    xb, yb, idx = next(iter(dm.push_dataloader(batch_size=8)))
    assert idx.tolist() == list(range(8))
    train = dm.vis_dataset("train")
    for k in (0, 5):
        assert torch.allclose(dm.denormalize(xb[k:k + 1])[0], train[int(idx[k])][0], atol=1e-6)
        assert yb[k] == train[int(idx[k])][1]
    xt, yt = next(iter(dm.train_dataloader()))
    assert xt.shape == (16, 3, 64, 64) and len(dm.train_dataloader()) == 96 // 16


def test_every_image_carries_its_class_concepts(dm, probe_items):
    ds = dm.probe_dataset("val")
    assert ds.class_concepts == dm.class_concepts and len(ds.class_concepts) == 12
    distractor_colors = {ds.concept_names.index(c) for c in shapes_render.DISTRACTOR_COLORS}
    object_side = []
    for split, items in probe_items.items():
        for item in items:
            seg, label = item["seg"], int(item["label"])
            concepts = ds.class_concepts[label]
            present = set(seg.unique().tolist())
            assert set(concepts) <= present, (split, int(item["index"]))
            # the class's pixels = those carrying all its defining concepts: one object of plausible size
            mask = torch.stack([(seg == c).any(0) for c in concepts]).all(0)
            ys, xs = mask.nonzero(as_tuple=True)
            object_side.append(max(ys.max() - ys.min(), xs.max() - xs.min()).item() + 1)
            # no other colour than the class colour and the distractor colours
            colors = {c for c in present if ds.category_of(c) == "color"}
            assert colors - {concepts[1]} <= distractor_colors
            # exactly one image-level scene label
            scenes = [ds.category_of(c) for c in item["image_labels"].nonzero().flatten().tolist()]
            assert scenes == ["scene"]
            # every category with pixel labels is in a fixed map order (color, object, part, texture)
            assert [ds.category_of(int(seg[k].max())) for k in (0, 1, 3)] == ["color", "object", "texture"]
    assert 14 <= np.median(object_side) <= 36  # ~25-50% of the 64 px side


def test_landmarks_lie_inside_their_part_masks(probe_items, dm):
    ds = dm.probe_dataset("val")
    assert ds.part_names == shapes_render.PART_NAMES and len(ds.part_concept_ids) == 8
    n_points = 0
    for items in probe_items.values():
        for item in items:
            lm, seg = item["landmarks"], item["seg"]
            assert lm.shape == (8, 2)
            for k, cid in enumerate(ds.part_concept_ids):
                present = bool((seg == cid).any())
                assert present == bool(torch.isfinite(lm[k]).all())
                if present:
                    x, y = lm[k].tolist()
                    assert (seg[:, int(round(y)), int(round(x))] == cid).any()
                    n_points += 1
    assert n_points == 2 * sum(len(v) for v in probe_items.values())  # two parts of each main object


def test_probe_batches_collate(dm):
    ds = dm.probe_dataset("test")
    assert dm.probe_dataset("test") is ds  # one object per split: its decoded-item cache survives epochs
    batch = next(iter(DataLoader(ds, batch_size=12)))
    assert batch["image"].shape == (12, 3, 64, 64) and batch["raw"].shape == (12, 3, 64, 64)
    assert batch["seg"].shape == (12, 4, 64, 64) and batch["seg"].dtype == torch.long
    assert batch["image_labels"].shape == (12, ds.num_concepts + 1) and batch["landmarks"].shape == (12, 8, 2)
    assert torch.allclose(dm.normalize(batch["raw"]), batch["image"], atol=1e-6)
    assert batch["label"].tolist() == list(range(12))
    assert ds.concept_names[0] == "-" and set(ds.category_names) == {"color", "object", "part", "scene", "texture"}


def test_probe_size_and_mask_size(tmp_path):
    dm = ShapesDataModule(tmp_path, n_train=24, n_val=24, n_test=12, mask_size=32, probe_size=12)
    ds = dm.probe_dataset("val")
    assert len(ds) == 12 and sorted(ds.labels) == list(range(12)) and ds.seg_size == (32, 32)
    assert ds[0]["seg"].shape == (4, 32, 32) and ds[0]["image"].shape == (3, 64, 64)


def test_decoded_cache_is_used(tmp_path):
    dm = ShapesDataModule(tmp_path, n_train=12, n_val=12, n_test=12)
    dm.setup()
    assert all((dm.folder / f"decoded_{s}.npz").exists() for s in ("train", "val", "test"))
    first = dm.vis_dataset("train").images.clone()
    for p in (dm.folder / "images" / "shapes").glob("train_*.png"):
        p.unlink()  # a second setup must not need the PNGs
    again = ShapesDataModule(tmp_path, n_train=12, n_val=12, n_test=12)
    again.setup()
    assert torch.equal(again.vis_dataset("train").images, first)


def test_corrupt_png_says_delete_folder(tmp_path):
    dm = ShapesDataModule(tmp_path, n_train=12, n_val=12, n_test=12)
    dm.prepare_data()
    (dm.folder / "images" / "shapes" / "val_000013.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as e:
        dm.setup()
    msg = str(e.value)
    assert "val_000013.png" in msg and f"delete {dm.folder}" in msg and "regenerated" in msg
    (dm.folder / "classes.csv").unlink()
    with pytest.raises(DataError, match=r"classes\.csv is missing.*delete"):
        ShapesDataModule(tmp_path, n_train=12, n_val=12, n_test=12).setup()


def test_killed_generation_leaves_no_folder(tmp_path, monkeypatch):
    def dies(root, params, workers=None):
        (Path(root) / "index.csv").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_render, "generate", dies)
    dm = ShapesDataModule(tmp_path, n_train=12, n_val=12, n_test=12)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_config_mismatch_names_the_option(dm):
    bad = ShapesDataModule(dm.data_dir, num_classes=10, **SMALL)
    with pytest.raises(DataError, match=r"datamodule\.num_classes=10 but the data in .*shapes-\w+ has num_classes=12"):
        bad.setup()
    with pytest.raises(DataError, match=r"datamodule\.channels=1 .* has channels=3"):
        ShapesDataModule(dm.data_dir, channels=1, **SMALL).setup()


def test_generation_speed_sanity(tmp_path):
    params = dict(seed=0, image_size=64, mask_size=None, distractor_prob=0.7, n_train=100, n_val=0, n_test=0)
    start = time.perf_counter()
    generate_folder(tmp_path / "s", params, workers=1)
    # ~2 ms per image on one idle core (the budget: 10k images in under a minute on 2 cores); the bound leaves
    # room for a machine shared with other jobs.
    assert time.perf_counter() - start < 5.0


def test_generation_workers_get_their_own_signal_handlers(tmp_path, monkeypatch):
    """During a run SIGINT/SIGTERM only record the signal (pipeline/interrupts.py). Forked pool workers that inherited
    that handler ignored Pool.terminate, and a worker blocked on the pool's queue kept the parent waiting forever (a
    hung CI run). The workers now end on SIGTERM and leave Ctrl-C to the parent, and none outlives the generation."""
    import multiprocessing as mp
    import os
    import signal

    seen = tmp_path / "handlers"
    seen.mkdir()
    monkeypatch.setitem(_RECORD, "dir", seen)
    monkeypatch.setitem(_RECORD, "chunk", shapes_render._write_chunk)
    # the forked workers see the patched module (the job is pickled by name: a module-level function)
    monkeypatch.setattr(shapes_render, "_write_chunk", _recording_chunk)
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        params = dict(seed=0, image_size=16, mask_size=None, distractor_prob=0.7, n_train=1000, n_val=0, n_test=0)
        generate_folder(tmp_path / "s", params, workers=2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    reports = [f.read_text() for f in seen.iterdir()]
    assert reports and all(r == "True True" for r in reports), reports   # the pool's workers, not the parent
    assert str(os.getpid()) not in {f.name for f in seen.iterdir()}
    assert not mp.active_children()
    assert len(list((tmp_path / "s" / "images" / "shapes").glob("train_??????.png"))) == 1000


_RECORD: dict = {}


def _recording_chunk(job):
    """shapes_render._write_chunk that first writes which SIGTERM/SIGINT handlers its process has."""
    import os
    import signal
    term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    (_RECORD["dir"] / str(os.getpid())).write_text(f"{term is signal.SIG_DFL} {intr is signal.SIG_IGN}")
    return _RECORD["chunk"](job)
