"""`shapes`: the default data set, a procedurally generated concept set written in the Broden format.

Classes are conjunctions of two concept categories (class "red-circle" = object circle AND color red; 4 shapes x 3
colours = 12 classes); nuisances (scene palette, background and fill texture, position, scale, rotation, a small
distractor in a colour no class uses) vary independently of the class. See datamodules/shapes_render.py for the
vocabulary and the drawing.

Generated once per parameter set into ``<data_dir>/shapes-<hash>/`` (written into a temporary folder and renamed, so
a killed generation leaves no half data set). Besides the Broden tables the folder holds classes.csv (each class's
defining concepts), landmarks.csv (image, part, x, y: the centre of each visible part of the main object, in image
pixel-index coordinates, x = column, y = row, so pixel [round(y), round(x)] lies on the part; independent of
mask_size) and generation.json. The first setup() decodes each split once into
decoded_<split>.npz (uint8), so training never decodes PNGs.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from datamodules import shapes_render
from datamodules.base import BaseDataModule, TensorImages, read_image
from datamodules.broden import BrodenDataset
from datamodules.errors import DataError

GENERATOR_VERSION = 1  # bump when the drawing changes, so cached folders are not reused


def dataset_folder(data_dir, params: dict) -> Path:
    key = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    return Path(data_dir) / f"shapes-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def regenerate_hint(folder) -> str:
    return f"delete {folder} and it is regenerated on the next run (ShapesDataModule.prepare_data)"


def generate_folder(folder, params: dict, workers: int | None = None) -> float:
    """Generate into a temporary sibling folder and rename it into place; returns the seconds it took."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        shapes_render.generate(tmp, params, workers)
        seconds = time.perf_counter() - start
        with open(tmp / "generation.json", "w") as f:
            json.dump({"version": GENERATOR_VERSION, "params": params, "seconds": round(seconds, 2)}, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "index.csv").exists():  # not a concurrent generator finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return seconds


class ShapesProbe(BrodenDataset):
    """The Broden probe items of a shapes folder plus ``landmarks`` float [P, 2] (x, y; NaN where the part is not
    in the image), in the order of ``part_names``; also ``class_concepts``, ``part_names``, ``part_concept_ids``."""

    def __init__(self, root, split=None, **kwargs):
        super().__init__(root, split, **kwargs)
        self.class_concepts = read_class_concepts(self.root, self.hint)
        self.part_concept_ids = self.concepts_in("part")
        self.part_names = [self.concept_names[i] for i in self.part_concept_ids]
        slot = {name: k for k, name in enumerate(self.part_names)}
        wanted = {row["image"]: n for n, row in enumerate(self.rows)}
        self.landmarks = np.full((len(self.rows), len(self.part_names), 2), np.nan, dtype=np.float32)
        path = self.root / "landmarks.csv"
        if not path.exists():
            raise DataError(f"{path} not found. To fix: {self.hint}")
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                n = wanted.get(r["image"])
                if n is not None:
                    self.landmarks[n, slot[r["part"]]] = (float(r["x"]), float(r["y"]))

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["landmarks"] = torch.from_numpy(self.landmarks[int(item["index"])])
        return item


def read_class_concepts(root: Path, hint: str) -> dict[int, list[int]]:
    path = Path(root) / "classes.csv"
    if not path.exists():
        raise DataError(f"{path} not found. To fix: {hint}")
    with open(path, newline="") as f:
        return {int(r["class"]): [int(c) for c in r["concepts"].split(";")] for r in csv.DictReader(f)}


class ShapesDataModule(BaseDataModule):
    """Generated shapes (see module docstring). Generation parameters: seed, image_size, mask_size (masks at image
    resolution when None), n_train, n_val, n_test, distractor_prob. probe_size: the probe set is the first
    probe_size images of the split (classes are interleaved, so any prefix is balanced)."""

    default_num_classes = len(shapes_render.CLASSES)
    default_channels = 3
    default_image_size = 64
    # Per-channel statistics of generated training images (seed 0, 8000 images, 64 px), rounded.
    default_mean = (0.522, 0.499, 0.480)
    default_std = (0.259, 0.240, 0.213)

    def __init__(self, data_dir, image_size: int = 64, mask_size: int | None = None, n_train: int = 6000,
                 n_val: int = 1000, n_test: int = 1000, distractor_prob: float = 0.7, probe_size: int | None = None,
                 workers: int | None = None, **kwargs):
        super().__init__(data_dir, image_size=image_size, **kwargs)
        self.params = {"seed": self.seed, "image_size": int(image_size),
                       "mask_size": None if mask_size is None else int(mask_size), "n_train": int(n_train),
                       "n_val": int(n_val), "n_test": int(n_test), "distractor_prob": float(distractor_prob)}
        self.folder = dataset_folder(self.data_dir, self.params)
        self.hint = regenerate_hint(self.folder)
        self.probe_size, self.workers = probe_size, workers
        self.class_concepts = shapes_render.class_concepts()
        self._probes: dict[str, ShapesProbe] = {}

    def _where(self):
        return str(self.folder)

    def prepare_data(self):
        if not self.folder.exists():
            generate_folder(self.folder, self.params, self.workers)

    def _load(self):
        # setup() without prepare_data() (direct use outside a Trainer): generate here; the rename is atomic.
        self.prepare_data()
        for name in ("index.csv", "classes.csv", "images"):
            if not (self.folder / name).exists():
                raise DataError(f"{self.folder / name} is missing: the shapes folder is incomplete. "
                                f"To fix: {self.hint}")
        with open(self.folder / "classes.csv", newline="") as f:
            class_names = [r["name"] for r in csv.DictReader(f)]
        self.class_concepts = read_class_concepts(self.folder, self.hint)
        with open(self.folder / "index.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        sources = {split: TensorImages(*self._decoded(split, [r for r in rows if r["split"] == split]))
                   for split in ("train", "val", "test")}
        return sources, class_names

    def _decoded(self, split: str, rows: list[dict]):
        """uint8 [N, 3, H, W] images and labels of a split's index rows, decoded once and cached in
        decoded_<split>.npz."""
        cache = self.folder / f"decoded_{split}.npz"
        if cache.exists():
            try:
                with np.load(cache) as z:
                    images, labels = z["images"], z["labels"]
                if len(images) == len(rows):
                    return torch.from_numpy(images), torch.from_numpy(labels)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # a damaged cache is rebuilt from the PNGs below
        hint = f"it is listed in {self.folder / 'index.csv'}. To fix: {self.hint}"
        images = np.stack([read_image(self.folder / "images" / r["image"], 3, hint=hint) for r in rows])
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        labels = np.array([int(r["class"]) for r in rows], dtype=np.int64)
        tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def probe_dataset(self, split: str = "val") -> ShapesProbe:
        """The probe set of a split; one object per split, so its in-memory cache of decoded items lasts across
        epochs."""
        if split not in self._probes:
            self.prepare_data()
            self._probes[split] = ShapesProbe(self.folder, split, mean=self.mean, std=self.std,
                                              limit=self.probe_size, cache=True, hint=self.hint)
        return self._probes[split]
