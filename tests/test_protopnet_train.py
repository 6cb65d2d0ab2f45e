"""ProtoPNet training: every phase trains exactly its parameters, resume mid-schedule continues the same phase, the
prototype callback writes its gallery and measures quality against the toy data's ground-truth masks."""
from __future__ import annotations


import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from models.protopnet import ProtoPNet

SIZE, CLASSES = 24, 3
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])


def toy_images(n: int, seed: int):
    """Grey noise with one 6x6 square whose colour is the class; the square's mask is the ground truth."""
    g = torch.Generator().manual_seed(seed)
    x = 0.4 + 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    y = torch.arange(n) % CLASSES
    seg = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.long)
    pos = torch.randint(0, SIZE - 6, (n, 2), generator=g)
    for i in range(n):
        r, c = pos[i].tolist()
        x[i, :, r:r + 6, c:c + 6] = COLOURS[y[i]][:, None, None]
        seg[i, 0, r:r + 6, c:c + 6] = int(y[i]) + 1
    return x, y, seg


class ToyProbe(Dataset):
    num_concepts, seg_size, max_maps = CLASSES, (SIZE, SIZE), 1
    category_names = ["color"]
    concept_names = ["-", "red", "green", "blue"]
    concept_categories = ["", "color", "color", "color"]
    class_concepts = {c: [c + 1] for c in range(CLASSES)}

    def __init__(self, x, y, seg, normalize):
        self.x, self.y, self.seg, self.normalize = x, y, seg, normalize

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.normalize(self.x[i]), "raw": self.x[i], "label": self.y[i], "seg": self.seg[i],
                "image_labels": torch.zeros(CLASSES + 1, dtype=torch.bool), "index": i}


class ToyData(pl.LightningDataModule):
    num_classes, channels, image_size = CLASSES, 3, SIZE
    class_names = ["red", "green", "blue"]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, n_train: int = 120, batch_size: int = 24):
        super().__init__()
        self.batch_size = batch_size
        self.splits = {"train": toy_images(n_train, 0), "val": toy_images(30, 1), "test": toy_images(30, 2)}

    def normalize(self, x01):
        m, s = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)
        return (x01 - m.to(x01)) / s.to(x01)

    def _ds(self, split, with_index=False):
        x, y, _ = self.splits[split]
        extra = (torch.arange(len(x)),) if with_index else ()
        return TensorDataset(self.normalize(x), y, *extra)

    def train_dataloader(self):
        return DataLoader(self._ds("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self._ds("val"), batch_size=64)

    def test_dataloader(self):
        return DataLoader(self._ds("test"), batch_size=64)

    def push_dataloader(self, batch_size=None):
        return DataLoader(self._ds("train", with_index=True), batch_size=batch_size or 32, shuffle=False)

    def vis_dataset(self, split="val"):
        x, y, _ = self.splits[split]
        return TensorDataset(x, y)

    def probe_dataset(self, split="val"):
        return ToyProbe(*self.splits[split], self.normalize)


def toy_model(**kw) -> ProtoPNet:
    torch.manual_seed(0)
    # the paper's loss coefficients (the default), stated so that the toy does not move with the shapes default
    args = dict(num_classes=CLASSES, channels=3, image_size=SIZE, prototypes_per_class=2, prototype_dim=16,
                widths=[8, 16], push_batch_size=32, coefs={"crs_ent": 1.0, "clst": 0.8, "sep": 0.08, "l1": 1e-4},
                schedule=dict(warm_epochs=1, push_start=10, push_every=10, last_layer_epochs=1),
                phase_lrs={"warm": {"add_on": 3e-3, "prototypes": 3e-3},
                           "joint": {"backbone": 1e-3, "add_on": 3e-3, "prototypes": 3e-3},
                           "last_layer": {"last_layer": 1e-3}})
    args.update(kw)
    return ProtoPNet(**args)


def trainer(tmp_path, max_epochs, callbacks=(), **kw):
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                      callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True,
                                                 save_top_k=0), *callbacks], **kw)


GROUP_NAMES = ("backbone", "add_on", "prototypes", "last_layer")


class Snapshots(Callback):
    """Every group's parameters at the start (after the push) and end of each epoch, plus BN running means."""

    def __init__(self):
        self.starts, self.ends, self.bn = {}, {}, {}

    def grab(self, m):
        return {g: [p.detach().clone() for p in m.group_parameters(g)] for g in GROUP_NAMES}

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if batch_idx == 0:
            self.starts[trainer.current_epoch] = self.grab(m)
            self.bn[trainer.current_epoch] = m.backbone.stages[0][0][1].running_mean.clone()

    def on_train_epoch_end(self, trainer, m):
        self.ends[trainer.current_epoch] = self.grab(m)
        self.bn[(trainer.current_epoch, "end")] = m.backbone.stages[0][0][1].running_mean.clone()


def changed(a, b):
    return any(not torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("solver", ["epochs", "convex"])
def test_each_phase_trains_exactly_its_parameters(tmp_path, solver):
    model, snaps = toy_model(freeze_batchnorm=True, last_layer_fit={"solver": solver}), Snapshots()
    trainer(tmp_path, 3, [snaps]).fit(model, datamodule=ToyData())
    assert [h["phase"] for h in model.phase_history] == ["warm", "joint", "last_layer"]
    # convex: the push solves the last layer before the epoch starts; its epochs then take no gradient step
    expect = {0: {"add_on", "prototypes"}, 1: {"backbone", "add_on", "prototypes"},
              2: {"last_layer"} if solver == "epochs" else set()}
    assert changed(snaps.ends[1]["last_layer"], snaps.starts[2]["last_layer"]) == (solver == "convex")
    assert ("last_layer_fit" in model.push_history[0]) == (solver == "convex")
    for epoch, trained in expect.items():
        for g in GROUP_NAMES:
            assert changed(snaps.starts[epoch][g], snaps.ends[epoch][g]) == (g in trained), (epoch, g)
    # freeze_batchnorm: frozen backbone keeps its BN statistics in warm and last-layer epochs, updates them in joint
    assert torch.equal(snaps.bn[0], snaps.bn[(0, "end")]) and torch.equal(snaps.bn[2], snaps.bn[(2, "end")])
    assert not torch.equal(snaps.bn[1], snaps.bn[(1, "end")])
    # the push at the start of epoch 2 moved the prototypes onto training patches (distance ~0 there)
    assert [h["epoch"] for h in model.push_history] == [2]
    assert changed(snaps.ends[1]["prototypes"], snaps.starts[2]["prototypes"])
    assert model.push_history[0]["pushed"] == model.num_prototypes
    assert all(p.requires_grad for p in model.parameters())


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, m):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class PhaseAtStart(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if batch_idx == 0:
            self.seen.append((trainer.current_epoch, m.phase, sorted(
                g for g in GROUP_NAMES if all(p.requires_grad for p in m.group_parameters(g)))))


def test_resume_mid_schedule_continues_the_same_phase(tmp_path):
    sched = dict(warm_epochs=1, push_start=10, push_every=10, last_layer_epochs=3)
    full = toy_model(schedule=sched)
    trainer(tmp_path / "full", 5).fit(full, datamodule=ToyData())

    first = toy_model(schedule=sched)
    trainer(tmp_path / "a", 5, [StopAfter(2)], min_epochs=1).fit(first, datamodule=ToyData())
    assert [h["phase"] for h in first.phase_history] == ["warm", "joint", "last_layer"]
    resumed, seen = toy_model(schedule=sched), PhaseAtStart()
    trainer(tmp_path / "a", 5, [seen]).fit(resumed, datamodule=ToyData(),
                                           ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    # the resumed run picks up inside the last-layer block: no second push, only the last layer trains
    assert seen.seen[0] == (3, "last_layer", ["last_layer"])
    assert resumed.phase_history == full.phase_history
    assert [h["epoch"] for h in resumed.push_history] == [h["epoch"] for h in full.push_history] == [2]
    assert resumed.push_history[0]["unique_sources"] == first.push_history[0]["unique_sources"]
    assert torch.equal(resumed.last_push.image_index, first.last_push.image_index)
    assert torch.equal(resumed.prototype_vectors.detach(), first.prototype_vectors.detach())  # frozen since push


@pytest.mark.slow
def test_gallery_and_quality_on_ground_truth(tmp_path):
    from algorithms.prototypes import PrototypeQuality, PrototypeRecords
    from callbacks.prototypes import PrototypeCallback
    model = toy_model(schedule=dict(warm_epochs=2, push_start=10, push_every=10, last_layer_epochs=2))
    cb = PrototypeCallback(num_explained=2, purity_k=5, probe_limit=None)
    # conf/model/protopnet.yaml monitors val/acc_pushed (val/acc once the prototypes are projected, 0 before)
    best = ModelCheckpoint(dirpath=str(tmp_path / "best"), monitor="val/acc_pushed", mode="max", filename="{epoch}")
    tr = trainer(tmp_path, 10, [cb, best])
    dm = ToyData()
    tr.fit(model, datamodule=dm)
    # the tested checkpoint is one with projected prototypes (epochs 8, 9), never an earlier joint epoch
    assert best.best_model_path.endswith(("epoch=8.ckpt", "epoch=9.ckpt"))
    acc = tr.test(model, datamodule=dm, ckpt_path=best.best_model_path, verbose=False)[0]["test/acc"]
    assert acc >= 0.8  # chance: 0.33
    out = tmp_path / "interp" / "prototypes" / "epoch_008"
    assert (out / "gallery_p00.png").is_file() and len(list(out.glob("this_looks_like_that_*.png"))) == 2
    records = PrototypeRecords.load(out / "prototypes.json").prototypes
    assert len(records) == model.num_prototypes and all(r["pushed"] for r in records)
    quality = PrototypeQuality.load(out / "quality.json").metrics()
    # recompute the hit rate from the masks independently: the high-activation box of the source image holds at
    # least half of the square of the prototype's colour, or is at least half that square
    _, _, seg = dm.splits["train"]
    hits = []
    for r in records:
        y0, y1, x0, x1 = r["high_activation_box"]
        square = seg[r["source_index"], 0] == r["class"] + 1
        inside = int(square[y0:y1, x0:x1].sum())
        hits.append(inside >= 0.5 * (y1 - y0) * (x1 - x0) or inside >= 0.5 * int(square.sum()))
    assert quality["class_object_hit_rate"] == pytest.approx(sum(hits) / len(hits))
    # the classes are told apart by the squares alone: the prototypes must look at them
    assert quality["class_object_hit_rate"] >= 0.8, quality
    assert 0 <= quality["purity"] <= 1 and quality["unique_sources"] == len({r["source_index"] for r in records})
    assert cb.last_metrics["interp/prototypes/class_object_hit_rate"] == quality["class_object_hit_rate"]
    for r in records:  # the recorded boxes hold the source patch
        y0, y1, x0, x1 = r["receptive_field"]
        assert 0 <= y0 < y1 <= SIZE and 0 <= x0 < x1 <= SIZE


def test_quality_metrics_hand_computed():
    from algorithms.prototypes import class_object_hits, last_layer_sparsity, purity
    from models.protopnet_push import NearestPatches, PushResult
    # 3 images, one label map each, 2x2 feature cells; concepts 1..3
    centre = torch.tensor([[[[1, 1], [0, 2]]], [[[2, 2], [3, 0]]], [[[1, 3], [3, 3]]]], dtype=torch.int16)
    # prototype 0: patches on concepts 1, 1, 1, 2 -> purity 3/4; prototype 1: 2, 3, 3, 0 -> 2/4
    idx = torch.tensor([[0, 0, 2, 0], [0, 2, 2, 0]])
    pos = torch.tensor([[[0, 0], [0, 1], [0, 0], [1, 1]], [[1, 1], [0, 1], [1, 0], [1, 0]]])
    near = NearestPatches(torch.zeros(2, 4), idx, pos, torch.zeros(2, 4, dtype=torch.long))
    assert purity(near, centre, 3).tolist() == [0.75, 0.5]
    assert purity(near, centre, 3, [2]).tolist() == [0.25, 0.25]
    result = PushResult(prototypes=torch.zeros(3, 1), pushed=torch.tensor([True, True, False]),
                        classes=torch.tensor([0, 1, 1]), image_index=torch.tensor([1, 1, -1]),
                        position=torch.zeros(3, 2, dtype=torch.long), distance=torch.zeros(3),
                        activation=torch.zeros(3, 2, 2), receptive_field=torch.zeros(3, 4, dtype=torch.long),
                        high_activation_box=torch.tensor([[0, 4, 0, 4], [0, 2, 0, 2], [0, 1, 0, 1]]), image_size=8)
    seg = torch.zeros(2, 4, 4, dtype=torch.long)  # masks at half the image resolution
    seg[0, :2, :] = 3      # object concept 3 on the top half
    seg[1, :, :1] = 2      # colour concept 2 on the left column
    # class 0 = concept 3: box (whole 4x4 seg) holds the whole object -> hit;
    # class 1 = concepts 3 AND 2: object = 2 pixels, box = top-left 1x1 seg pixel holds half of it -> hit
    hits = class_object_hits(result, {1: seg}, {0: [3], 1: [3, 2]}, (4, 4))
    assert hits[:2].tolist() == [1.0, 1.0] and hits[2].isnan()
    hits = class_object_hits(result, {1: seg}, {0: [2, 1], 1: [1]}, (4, 4))  # concept 1 absent: no object
    assert hits[:2].tolist() == [0.0, 0.0]
    assert last_layer_sparsity(torch.tensor([[1.0, 0.0], [-0.5, 1e-4]])) == 0.5


def _ddp_fit(rank, world_size, root):
    # the process group exists already (tests/ddp_utils) and RANK/LOCAL_RANK are set: Lightning joins it as an
    # externally launched DDP job, the same code path as `train.py trainer=ddp_cpu`
    from callbacks.prototypes import PrototypeCallback
    model = toy_model(schedule=dict(warm_epochs=1, push_start=10, push_every=10, last_layer_epochs=1))
    cb = PrototypeCallback(num_explained=1, purity_k=3, probe_limit=None)
    tr = pl.Trainer(max_epochs=3, accelerator="cpu", devices=world_size, strategy="ddp", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=root, enable_checkpointing=False, callbacks=[cb])
    tr.fit(model, datamodule=ToyData())
    return {"prototypes": model.prototype_vectors.detach().clone(), "backbone": [p.detach().clone() for p in
                                                                                 model.backbone.parameters()],
            "last_layer": model.last_layer.weight.detach().clone(), "phases": model.phase_history,
            "pushes": [h["epoch"] for h in model.push_history], "source": model.last_push.image_index,
            "position": model.last_push.position, "metrics": cb.last_metrics}


@pytest.mark.ddp
@pytest.mark.slow
def test_schedule_and_push_under_ddp(tmp_path):
    from tests.ddp_utils import run_ddp
    r0, r1 = run_ddp(_ddp_fit, 2, args=(str(tmp_path),), timeout_s=300)
    assert [h["phase"] for h in r0["phases"]] == ["warm", "joint", "last_layer"] and r0["pushes"] == [2]
    for key in ("prototypes", "last_layer", "source", "position"):
        assert torch.equal(r0[key], r1[key]), key  # every rank ends with identical prototypes and weights
    assert all(torch.equal(a, b) for a, b in zip(r0["backbone"], r1["backbone"]))
    assert r0["phases"] == r1["phases"]
    # the prototype callback's metrics are reduced over both shards and identical on both ranks; rank 0 wrote files
    assert r0["metrics"] == r1["metrics"] and "interp/prototypes/purity" in r0["metrics"]
    assert (tmp_path / "interp" / "prototypes" / "epoch_002" / "gallery_p00.png").is_file()


def test_class_count_must_match_the_data(tmp_path):
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match=r"model\.num_classes=4"):
        trainer(tmp_path, 1).fit(toy_model(num_classes=4), datamodule=ToyData())
