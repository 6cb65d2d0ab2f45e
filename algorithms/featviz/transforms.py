"""Transforms of feature visualization: callables (images01 [B, C, H, W], generator) -> images, applied before every
step so the optimised image must work under small shifts, zooms and rotations (transformation robustness, Olah et
al. 2017). Consecutive affine transforms are fused into one resampling by `compose`."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def pad(width: int, value: float = 0.5):
    return lambda img, g: F.pad(img, (width,) * 4, mode="constant", value=value)


def jitter(d: int):
    """Random crop shifting the image by up to d pixels (one offset for the batch)."""
    def fn(img, g):
        dy, dx = torch.randint(0, d + 1, (2,), generator=g).tolist()
        H, W = img.shape[-2:]
        return img[..., dy:H - d + dy, dx:W - d + dx]
    return fn


def _affine(img: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AffineTransform:
    """A random per-image affine map; consecutive ones are fused by `compose` into one resampling (one
    grid_sample and its backward per step instead of one per transform)."""

    def __init__(self, theta_fn: Callable[[int, torch.Generator], Tensor]):
        self.theta_fn = theta_fn  # (batch, generator) -> [B, 2, 3] on the CPU

    def theta(self, batch: int, g: torch.Generator) -> Tensor:
        return self.theta_fn(batch, g)

    def __call__(self, img, g):
        return _affine(img, self.theta(img.shape[0], g).to(img))


def _homogeneous(theta: Tensor) -> Tensor:
    bottom = torch.tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], 1)


def random_scale(scales: Sequence[float] = (0.9, 0.95, 1.0, 1.05, 1.1)) -> AffineTransform:
    """Zoom each image by a factor drawn from `scales`."""
    s_all = torch.tensor(list(scales))

    def theta(B, g):
        s = s_all[torch.randint(0, len(s_all), (B,), generator=g)]
        th = torch.zeros(B, 2, 3)
        th[:, 0, 0] = th[:, 1, 1] = 1.0 / s
        return th
    return AffineTransform(theta)


def random_rotate(degrees: float = 10.0) -> AffineTransform:
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees]."""
    def theta(B, g):
        a = (torch.rand(B, generator=g) * 2 - 1) * math.radians(degrees)
        th = torch.zeros(B, 2, 3)
        th[:, 0, 0], th[:, 0, 1], th[:, 1, 0], th[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        return th
    return AffineTransform(theta)


def compose(transforms: Sequence[Callable]):
    """Apply transforms in order; runs of AffineTransforms are fused into one resampling (the output grid of the
    later transform is mapped through the earlier ones: theta = theta_1 @ theta_2 @ ...)."""
    transforms = list(transforms)

    def fn(img, g):
        i = 0
        while i < len(transforms):
            t = transforms[i]
            if isinstance(t, AffineTransform):
                theta = _homogeneous(t.theta(img.shape[0], g))
                while i + 1 < len(transforms) and isinstance(transforms[i + 1], AffineTransform):
                    i += 1
                    theta = theta @ _homogeneous(transforms[i].theta(img.shape[0], g))
                img = _affine(img, theta[:, :2].to(img))
            else:
                img = t(img, g)
            i += 1
        return img
    return fn


def fit_size(img: Tensor, size: Sequence[int], value: float = 0.5) -> Tensor:
    """Centre-crop (or pad with grey) the transformed images back to `size` = (H, W): models with a fixed input
    geometry (CapsNet's primary-capsule grid, a linear layer on flattened maps) see the size they were built for;
    the random jitter before it still shifts the content."""
    H, W = int(size[0]), int(size[1])
    h, w = img.shape[-2:]
    if (h, w) == (H, W):
        return img
    if h < H or w < W:
        dh, dw = max(0, H - h), max(0, W - w)
        img = F.pad(img, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="constant", value=value)
        h, w = img.shape[-2:]
    top, left = (h - H) // 2, (w - W) // 2
    return img[..., top:top + H, left:left + W]


def standard_transforms(scale: float = 1.0):
    """pad 12, jitter 8, scale 0.9-1.1, rotate +-10 degrees, jitter 4 (lucid's defaults, for 224 px); `scale`
    shrinks the pixel amounts for small images (64 px: 64/224)."""
    p = lambda n: max(1, round(n * scale))  # noqa: E731
    return compose([pad(p(12)), jitter(p(8)), random_scale(), random_rotate(10.0), jitter(p(4))])

