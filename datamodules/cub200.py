"""`cub200`: Caltech-UCSD Birds-200-2011 in its release layout, cropped to the bird's bounding box as ProtoPNet does
(Chen et al. 2019 crop every image to its box before training and push), then resized to image_size x image_size.

Layout (``<data_dir>/CUB_200_2011/`` or ``<data_dir>`` itself): images.txt (id path), image_class_labels.txt
(id class), train_test_split.txt (id is_train), bounding_boxes.txt (id x y width height, pixels), classes.txt
(class name), images/<class dir>/<file>.jpg. The validation split is carved from the official training images,
stratified and fixed by `seed` (val_fraction=0 uses the test images for validation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import IMAGENET_MEAN, IMAGENET_STD, BaseDataModule, FileImages, stratified_split
from datamodules.errors import DataError, network_failure

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
ARCHIVE = "CUB_200_2011.tgz"
ARCHIVE_MD5 = "97eceeb196236b17998738112f37df78"
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")


class CUB200DataModule(BaseDataModule):
    default_num_classes = 200
    default_channels = 3
    default_image_size = 224
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(self, data_dir, image_size: int = 224, crop: bool = True, val_fraction: float = 0.1,
                 download: bool = False, hflip: bool = True, **kwargs):
        super().__init__(data_dir, image_size=image_size, hflip=hflip, **kwargs)
        self.crop, self.val_fraction, self.download = bool(crop), float(val_fraction), bool(download)

    @property
    def root(self) -> Path:
        return self.data_dir if (self.data_dir / "images.txt").exists() else self.data_dir / "CUB_200_2011"

    def _where(self):
        return str(self.root)

    def _fix(self):
        return (f"set datamodule.download=true on a machine with internet access, or extract {ARCHIVE} "
                f"({URL}) into {self.data_dir}")

    def prepare_data(self):
        if self.download and not (self.root / "images.txt").exists():
            from torchvision.datasets.utils import download_and_extract_archive
            try:
                download_and_extract_archive(URL, str(self.data_dir), filename=ARCHIVE, md5=ARCHIVE_MD5)
            except Exception as e:  # noqa: BLE001 - every download failure gets the same instructions
                reason = network_failure(e) or f"{type(e).__name__}: {e}"
                raise DataError(f"cannot download CUB-200-2011 from {URL} ({reason}): no network? Download {ARCHIVE} "
                                f"on a machine with internet access and extract it into {self.data_dir} (it must "
                                f"give {self.data_dir / 'CUB_200_2011' / 'images.txt'}), then set "
                                f"datamodule.download=false") from e

    def _table(self, name: str, ncols: int) -> dict[int, list[str]]:
        path = self.root / name
        out = {}
        try:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    fields = line.split(maxsplit=ncols - 1)
                    if len(fields) != ncols:
                        raise ValueError(f"line {n} has {len(fields)} fields, expected {ncols}")
                    out[int(fields[0])] = [s.strip() for s in fields[1:]]
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}. To fix: {self._fix()}") from e
        return out

    def _load(self):
        missing = [f for f in FILES if not (self.root / f).is_file()]
        if missing or not (self.root / "images").is_dir():
            raise DataError(f"CUB-200-2011 not found: {', '.join(missing) or 'images/'} missing in {self.root}. "
                            f"To fix: {self._fix()}")
        paths = self._table("images.txt", 2)
        labels = self._table("image_class_labels.txt", 2)
        is_train = self._table("train_test_split.txt", 2)
        boxes = self._table("bounding_boxes.txt", 5)
        classes = self._table("classes.txt", 2)
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                            ("bounding_boxes.txt", boxes)):
            lacking = sorted(set(paths) - set(table))
            if lacking:
                raise DataError(f"{self.root / name} has no entry for image id(s) {lacking[:5]} of images.txt. "
                                f"To fix: {self._fix()}")
        ids = sorted(paths)
        class_ids = sorted(classes)
        index_of = {c: k for k, c in enumerate(class_ids)}
        y = np.array([index_of[int(labels[i][0])] for i in ids])
        # Box (x, y, w, h) -> crop corners (x0, y0, x1, y1).
        xyxy = [(float(b[0]), float(b[1]), float(b[0]) + float(b[2]), float(b[1]) + float(b[3]))
                for b in (boxes[i] for i in ids)]
        train_mask = np.array([is_train[i][0] == "1" for i in ids])
        hint = f"the file is listed in {self.root / 'images.txt'}. To fix: {self._fix()}"

        def source(idx):
            return FileImages([self.root / "images" / paths[ids[k]][0] for k in idx], y[idx], int(self.image_size),
                              int(self.channels), [xyxy[k] for k in idx] if self.crop else None, hint)

        train_idx, test_idx = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
        test = source(test_idx)
        if self.val_fraction > 0:
            keep, val = stratified_split(y[train_idx], self.val_fraction, self.seed)
            train, val = source(train_idx[keep]), source(train_idx[val])
        else:
            train, val = source(train_idx), test
        # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
        names = [classes[c][0].split(".", 1)[-1] for c in class_ids]
        return {"train": train, "val": val, "test": test}, names
