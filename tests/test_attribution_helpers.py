"""Small synthetic models and probe data shared by the attribution/featviz tests (no tests here; independent of the
real datamodules).

The probe set follows the datamodule interface: dict items with image, raw, label, seg [L, h, w] (concept ids),
image_labels, index; the dataset has concept_categories / class_concepts like a Broden probe set."""
from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.cnn import CNNClassifier


class ToyCAMNet(nn.Module):
    """x [B, 1, H, W] -> A = ReLU(conv1x1(x)) with channel weights (+1, -1) -> GAP -> linear W (no bias).
    Grad-CAM/CAM have closed forms: CAM_c = sum_k W_ck A_k, Grad-CAM_c = ReLU(CAM_c) / (H * W)."""

    unit_layer = "features"  # core.protocol.UnitHead: the units of the head are this layer's channels

    def __init__(self, weight=((2.0, 1.0), (-1.0, 3.0))):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.features_layer = nn.Sequential(self.conv, self.relu)
        self.head = nn.Linear(2, len(weight), bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.head.weight.copy_(torch.tensor(weight))

    def probe_layers(self):
        return OrderedDict([("features", self.features_layer)])

    def get_probe_layer(self, name=None):
        layers = self.probe_layers()
        name = name or "features"
        if name not in layers:
            raise ValueError(f"layer {name!r} is not a probe layer; available: {', '.join(layers)}")
        return layers[name]

    def class_scores(self, x):
        return self(x)

    def forward(self, x):
        return self.head(self.features_layer(x).mean((2, 3)))

    def unit_contributions(self, x):
        return self.features_layer(x).mean((2, 3)), self.head.weight


def small_cnn(num_classes: int = 4, image_size: int = 32, seed: int = 0) -> CNNClassifier:
    torch.manual_seed(seed)
    return CNNClassifier(num_classes=num_classes, channels=3, image_size=image_size, widths=(8, 16, 16, 32)).eval()


COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1]])
MEAN, STD = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1), torch.tensor([0.25, 0.25, 0.25]).view(3, 1, 1)


def square_image(i: int, size: int = 32, empty: bool = False):
    """A coloured square (class = colour) at a position drawn from i; returns raw [3, H, W] and the object mask."""
    g = torch.Generator().manual_seed(1000 + i)
    label = i % len(COLOURS)
    raw = torch.full((3, size, size), 0.5) + 0.05 * torch.rand(3, size, size, generator=g)
    mask = torch.zeros(size, size, dtype=torch.bool)
    if not empty:
        s = size // 4
        r, c = torch.randint(0, size - s, (2,), generator=g).tolist()
        mask[r:r + s, c:c + s] = True
        raw[:, mask] = COLOURS[label][:, None]
    return raw, mask, label


class SquaresProbe(torch.utils.data.Dataset):
    """Probe items (Broden interface): concept 1 = "square" (object), 2..5 colours; class k = square AND colour k.
    Every `empty_every`-th image has no object (an empty mask)."""

    def __init__(self, n: int = 24, size: int = 32, empty_every: int = 0):
        self.n, self.size, self.empty_every = n, size, empty_every
        self.concept_names = ["-", "square", "red", "green", "blue", "yellow"]
        self.concept_categories = ["", "object", "color", "color", "color", "color"]
        self.category_names = ["object", "color"]
        self.class_concepts = {k: [1, 2 + k] for k in range(len(COLOURS))}
        self.num_concepts = 5
        self.seg_size = (size, size)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        empty = bool(self.empty_every) and i % self.empty_every == self.empty_every - 1
        raw, mask, label = square_image(i, self.size, empty)
        seg = torch.zeros(2, self.size, self.size, dtype=torch.long)
        seg[0][mask] = 1
        seg[1][mask] = 2 + label
        return {"image": (raw - MEAN) / STD, "raw": raw, "label": torch.tensor(label), "seg": seg,
                "image_labels": torch.zeros(6, dtype=torch.bool), "index": torch.tensor(i)}


class SquaresData:
    """Datamodule-like holder of the probe set (what the callbacks read from trainer.datamodule)."""

    def __init__(self, n: int = 24, size: int = 32, empty_every: int = 0):
        self.probe = SquaresProbe(n, size, empty_every)
        self.num_classes, self.channels, self.image_size = len(COLOURS), 3, size
        self.class_names = ["red", "green", "blue", "yellow"]
        self.mean, self.std = MEAN.flatten().tolist(), STD.flatten().tolist()

    def probe_dataset(self, split="val"):
        return self.probe

    def normalize(self, x01):
        return (x01 - MEAN.to(x01)) / STD.to(x01)

    def denormalize(self, x):
        return x * STD.to(x) + MEAN.to(x)

    def train_images(self, n: int = 32):
        return torch.stack([self.probe[i]["image"] for i in range(min(n, len(self.probe)))])


def fake_trainer(tmp_path, data, epoch: int = 0):
    """What the callbacks' run() reads from a Trainer."""
    return SimpleNamespace(datamodule=data, default_root_dir=str(tmp_path), loggers=[], current_epoch=epoch,
                           global_step=0, max_epochs=1, sanity_checking=False)


@pytest.fixture(autouse=True)  # autouse in every test module that imports it
def one_thread():
    """Small tensors: one thread is faster and is not stalled by other processes on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
