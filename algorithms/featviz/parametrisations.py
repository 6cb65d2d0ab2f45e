"""Parametrisations of feature visualization: nn.Modules whose forward() returns images in [0, 1] [B, C, H, W],
optimised instead of the pixels (Olah et al., Distill 2017: a Fourier basis with 1/f scaling and decorrelated
colour make the optimisation prefer natural-image statistics)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


# Square root of the RGB colour correlation of natural images (ImageNet), the constant of the lucid papers;
# `colour_correlation_sqrt(images)` derives the same matrix from a data set's own pixels.
IMAGENET_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def colour_correlation_sqrt(images01: Tensor) -> Tensor:
    """Symmetric square root of the colour covariance of images [N, 3, H, W] in [0, 1]."""
    px = images01.transpose(0, 1).flatten(1).double()
    cov = torch.cov(px)
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T).float()


class _ImageParam(nn.Module):
    def __init__(self, channels: int, colour_sqrt: Tensor | None, decorrelate: bool):
        super().__init__()
        self.channels = channels
        if decorrelate and channels == 3:
            m = IMAGENET_COLOUR_SQRT if colour_sqrt is None else colour_sqrt
            # columns scaled so no decorrelated direction exceeds unit norm (keeps the sigmoid's input range)
            self.register_buffer("colour", m / m.norm(dim=0).max())
        else:
            self.colour = None

    def to_rgb(self, img: Tensor) -> Tensor:
        if self.colour is not None:
            img = torch.einsum("ij,bjhw->bihw", self.colour, img)
        return torch.sigmoid(img)


class PixelImage(_ImageParam):
    """Pixels (in decorrelated colour for RGB) through a sigmoid."""

    def __init__(self, batch: int, channels: int, size: int, sd: float = 0.01, decorrelate: bool = True,
                 colour_sqrt: Tensor | None = None, device=None, generator: torch.Generator | None = None):
        super().__init__(channels, colour_sqrt, decorrelate)
        init = torch.randn(batch, channels, size, size, generator=generator) * sd
        self.pixels = nn.Parameter(init.to(device))
        self.to(device)

    def forward(self) -> Tensor:
        return self.to_rgb(self.pixels)


class FourierImage(_ImageParam):
    """The image's 2-D spectrum, N(0, sd) at init, scaled by 1 / max(|f|, 1/size)^decay_power (1/f: every frequency
    band gets a similar share of the gradient, so high frequencies do not dominate), inverse real FFT, decorrelated
    colour, sigmoid."""

    def __init__(self, batch: int, channels: int, size: int, sd: float = 0.01, decay_power: float = 1.0,
                 decorrelate: bool = True, colour_sqrt: Tensor | None = None, device=None,
                 generator: torch.Generator | None = None):
        super().__init__(channels, colour_sqrt, decorrelate)
        self.size = size
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freq = (fy ** 2 + fx ** 2).sqrt()
        self.register_buffer("scale", 1.0 / freq.clamp_min(1.0 / size) ** decay_power)
        init = torch.randn(batch, channels, size, size // 2 + 1, 2, generator=generator) * sd
        self.spectrum = nn.Parameter(init.to(device))
        self.to(device)

    def forward(self) -> Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        return self.to_rgb(img / 4)  # /4: the spectrum's scale puts pixel values ~4x above the sigmoid's knee


PARAMETRISATIONS = {"fourier": FourierImage, "pixel": PixelImage}
