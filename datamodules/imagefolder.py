"""`imagefolder`: any class-per-folder tree, ``<data_dir>/train/<class>/<image>``, with optional ``val/`` and
``test/`` trees of the same form. A missing val or test tree is carved from train (stratified, fixed by `seed`: test
first with test_fraction, then val with val_fraction). Class indices follow the sorted folder names of train/.
val_fraction=0 without a val/ tree validates on the test images. Images are converted to `channels`
(1: grey, 3: RGB) and resized to image_size x image_size."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, BaseDataModule, FileImages,
                              stratified_split)
from datamodules.errors import DataError


class ImageFolderDataModule(BaseDataModule):
    default_channels = 3
    default_image_size = 224
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(self, data_dir, image_size: int = 224, channels: int = 3, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, hflip: bool = True, **kwargs):
        if channels not in (1, 3):
            raise DataError(f"datamodule.channels={channels}: image folders are read as grey (1) or RGB (3)")
        super().__init__(data_dir, image_size=image_size, channels=channels, hflip=hflip, **kwargs)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        if self.num_classes is None:
            # the class count is the number of class folders in train/: read now (a directory listing), so that the
            # model, built before the data is set up, gets it through ${datamodule.num_classes}
            train_dir = self.data_dir / "train"
            if train_dir.is_dir():
                self.num_classes = len(self._class_folders(train_dir)) or None

    @staticmethod
    def _class_folders(tree: Path) -> list[str]:
        return sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))

    def _scan(self, tree: Path, classes: list[str] | None):
        """(paths, labels, class names) of one tree; classes=None takes them from the tree's folders."""
        folders = self._class_folders(tree)
        if classes is None:
            classes = folders
        unknown = [d for d in folders if d not in classes]
        if unknown:
            raise DataError(f"{tree} has class folder(s) {unknown} that {self.data_dir / 'train'} lacks; "
                            f"every class needs training images in train/<class>/")
        paths, labels = [], []
        for k, name in enumerate(classes):
            files = sorted(p for p in (tree / name).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += files
            labels += [k] * len(files)
        return paths, np.array(labels, dtype=np.int64), classes

    def _load(self):
        train_dir = self.data_dir / "train"
        if not train_dir.is_dir():
            raise DataError(f"{train_dir} not found; an image folder data set needs {self.data_dir}/train/<class>/"
                            f"<image> (and optionally val/ and test/ of the same form); set datamodule.data_dir")
        paths, labels, classes = self._scan(train_dir, None)
        if not classes:
            raise DataError(f"{train_dir} has no class folders; put each class's images in {train_dir}/<class>/")
        empty = [c for k, c in enumerate(classes) if not np.any(labels == k)]
        if empty:
            raise DataError(f"class folder(s) {[str(train_dir / c) for c in empty]} hold no images "
                            f"(extensions {IMAGE_EXTENSIONS}); add images or remove the folder")
        hint = "replace the file or delete it from the image folder tree"

        def source(p, y):
            return FileImages(p, y, int(self.image_size), int(self.channels), hint=hint)

        idx = np.arange(len(paths))
        trees = {}
        for split, fraction, seed in (("test", self.test_fraction, self.seed), ("val", self.val_fraction,
                                                                                  self.seed + 1)):
            tree = self.data_dir / split
            if tree.is_dir():
                p, y, _ = self._scan(tree, classes)
                trees[split] = source(p, y)
            else:
                keep, carved = stratified_split(labels[idx], fraction, seed)
                trees[split] = source([paths[k] for k in idx[carved]], labels[idx[carved]])
                idx = idx[keep]
        trees["train"] = source([paths[k] for k in idx], labels[idx])
        if self.val_fraction == 0 and not (self.data_dir / "val").is_dir():
            trees["val"] = trees["test"]  # as in the other data modules: val_fraction=0 validates on test
        return trees, classes
