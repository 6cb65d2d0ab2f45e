"""`digits`: scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn, so fully offline),
upsampled bilinearly to 28x28 as an offline stand-in for MNIST. Values are scaled from 0..16 to [0, 1]; the
train/val/test split is stratified and fixed by `seed`."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.base import BaseDataModule, TensorImages, stratified_split


class DigitsDataModule(BaseDataModule):
    default_num_classes = 10
    default_channels = 1
    default_image_size = 28
    # Statistics of the 28x28 upsampled images (all 1,797), rounded.
    default_mean = (0.305,)
    default_std = (0.325,)

    def __init__(self, data_dir=".", image_size: int = 28, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 **kwargs):
        # image_size is the resize target here, so it always matches the data it produces.
        super().__init__(data_dir, image_size=image_size, **kwargs)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)

    def _where(self):
        return "sklearn.datasets.load_digits()"

    def _load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
        size = int(self.image_size)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
        images = x.mul(255).round().to(torch.uint8)
        labels = np.asarray(digits.target, dtype=np.int64)
        rest, test = stratified_split(labels, self.test_fraction, self.seed)
        keep, val = stratified_split(labels[rest], self.val_fraction / (1.0 - self.test_fraction), self.seed + 1)
        train, val = rest[keep], rest[val]

        def part(idx):
            return TensorImages(images[idx], labels[idx])

        return {"train": part(train), "val": part(val), "test": part(test)}, [str(d) for d in digits.target_names]
