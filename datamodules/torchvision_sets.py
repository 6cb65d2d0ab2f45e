"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision, held in memory as uint8.

Nothing is downloaded unless ``download=true`` (then only in prepare_data, i.e. once per node). The validation split
is carved from the official training set, stratified and fixed by `seed` (val_fraction=0 uses the test set for
validation). Files may also be placed by hand: the MNIST-style IDX files, raw or .gz, in
``<data_dir>/MNIST/raw`` (``FashionMNIST/raw``), and CIFAR-10's ``cifar-10-batches-py`` folder or its
``cifar-10-python.tar.gz`` in ``<data_dir>``.

CIFAR-10 checksums: torchvision checks every batch file against the md5 of the official release. This module does
that check itself first (``verify_checksums=true``, the default) so that a mismatch names the file, then loads
through a subclass whose md5s are None, which makes torchvision check only that the files exist.
``verify_checksums=false`` accepts a re-packed copy in the same pickle format (the tests use this).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import extract_archive

from datamodules.base import BaseDataModule, TensorImages, stratified_split
from datamodules.errors import DataError, network_failure


class _TorchvisionDataModule(BaseDataModule):
    """Shared loading: subclasses say which files must exist and how to read (images uint8 [N,C,H,W], labels)."""

    name = ""
    default_shift = 0
    default_hflip = False

    def __init__(self, data_dir, download: bool = False, val_fraction: float = 0.1, shift: int | None = None,
                 hflip: bool | None = None, **kwargs):
        super().__init__(data_dir, shift=self.default_shift if shift is None else shift,
                         hflip=self.default_hflip if hflip is None else hflip, **kwargs)
        self.download, self.val_fraction = bool(download), float(val_fraction)

    # --- per data set ---
    def _folder(self) -> Path:
        raise NotImplementedError

    def _required(self) -> list[str]:
        raise NotImplementedError

    def _read(self, train: bool):
        """(images uint8 [N, C, H, W], labels int64 [N], class names)."""
        raise NotImplementedError

    def _unpack_placed_archives(self):
        """Extract archives a user placed by hand (offline counterpart of download)."""

    # --- shared ---
    def _where(self):
        return str(self._folder())

    def _fix(self) -> str:
        return (f"set datamodule.download=true on a machine with internet access (files go to {self._folder()}), "
                f"or copy the files {self._required()} there")

    def prepare_data(self):
        if self.download:
            self._read_guarded(True, download=True)
            self._read_guarded(False, download=True)

    def _check_files(self):
        self._unpack_placed_archives()
        folder = self._folder()
        missing = [f for f in self._required() if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{self.name} not found: {', '.join(missing)} missing in {folder}. To fix: {self._fix()}")

    def _read_guarded(self, train: bool, download: bool = False):
        try:
            return self._read(train, download)
        except DataError:
            raise
        except (RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError, KeyError,
                IndexError) as e:  # what torchvision's parsers raise on truncated or foreign files
            reason = network_failure(e) if download else None
            if reason is not None:
                raise DataError(f"cannot download {self.name} ({reason}): no network? Fetch the files on a machine "
                                f"with internet access and copy them into {self._folder()}: "
                                f"{', '.join(self._required())} (or their archives, see the module docstring), then "
                                f"set datamodule.download=false") from e
            if not any((self._folder() / f).is_file() for f in self._required()):
                raise DataError(f"cannot read {self.name} from {self._folder()}: {type(e).__name__}: {e}. "
                                f"No data files are there. To fix: {self._fix()}") from e
            raise DataError(f"cannot read {self.name} from {self._folder()}: {type(e).__name__}: {e}. "
                            f"The files look corrupt; delete them and {self._fix()}") from e

    def _load(self):
        self._check_files()
        x_train, y_train, class_names = self._read_guarded(True)
        x_test, y_test, _ = self._read_guarded(False)
        test = TensorImages(x_test, y_test)
        if self.val_fraction > 0:
            train_idx, val_idx = stratified_split(y_train, self.val_fraction, self.seed)
            train, val = TensorImages(x_train[train_idx], y_train[train_idx]), \
                TensorImages(x_train[val_idx], y_train[val_idx])
        else:
            train, val = TensorImages(x_train, y_train), test
        return {"train": train, "val": val, "test": test}, class_names


class MNISTDataModule(_TorchvisionDataModule):
    name = "MNIST"
    dataset_cls = datasets.MNIST
    default_num_classes = 10
    default_channels = 1
    default_image_size = 28
    default_mean = (0.1307,)
    default_std = (0.3081,)
    default_shift = 2  # the CapsNet paper's augmentation: shifts of up to 2 pixels

    def _folder(self):
        return self.data_dir / self.dataset_cls.__name__ / "raw"

    def _required(self):
        return [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]

    def _unpack_placed_archives(self):
        for name in self._required():
            gz = self._folder() / f"{name}.gz"
            if not (self._folder() / name).is_file() and gz.is_file():
                extract_archive(str(gz), str(self._folder()))

    def _read(self, train, download=False):
        ds = self.dataset_cls(str(self.data_dir), train=train, download=download)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long().numpy(), list(ds.classes)


class FashionMNISTDataModule(MNISTDataModule):
    name = "FashionMNIST"
    dataset_cls = datasets.FashionMNIST
    default_mean = (0.2860,)
    default_std = (0.3530,)


class _CIFAR10Files(datasets.CIFAR10):
    """CIFAR10 with torchvision's md5s set to None: it then only checks that the files exist (see module doc)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR10DataModule(_TorchvisionDataModule):
    name = "CIFAR-10"
    default_num_classes = 10
    default_channels = 3
    default_image_size = 32
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)
    default_shift = 4  # pad 4 + random crop, the usual CIFAR augmentation
    default_hflip = True

    def __init__(self, data_dir, verify_checksums: bool = True, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.verify_checksums = bool(verify_checksums)

    def _folder(self):
        return self.data_dir / datasets.CIFAR10.base_folder

    def _required(self):
        c = datasets.CIFAR10
        return [name for name, _ in c.train_list + c.test_list] + [c.meta["filename"]]

    def _unpack_placed_archives(self):
        archive = self.data_dir / datasets.CIFAR10.filename
        if not self._folder().is_dir() and archive.is_file():
            extract_archive(str(archive), str(self.data_dir))

    def _check_files(self):
        super()._check_files()
        if not self.verify_checksums:
            return
        c = datasets.CIFAR10
        for name, md5 in c.train_list + c.test_list + [[c.meta["filename"], c.meta["md5"]]]:
            path = self._folder() / name
            if hashlib.md5(path.read_bytes()).hexdigest() != md5:
                raise DataError(f"{path} does not match the md5 of the official CIFAR-10 release ({md5}); the file "
                                f"is corrupt or re-packed. To fix: delete it and {self._fix()}; for a deliberately "
                                f"re-packed copy set datamodule.verify_checksums=false")

    def _read(self, train, download=False):
        cls = datasets.CIFAR10 if download else _CIFAR10Files
        ds = cls(str(self.data_dir), train=train, download=download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return images, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
