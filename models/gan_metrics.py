"""The Fréchet distance between Gaussian fits of two feature sets (the FID formula, Heusel et al. 2017):
||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}). Tr (S_1 S_2)^{1/2} is the sum of the square roots of the
eigenvalues of S_1^{1/2} S_2 S_1^{1/2} (symmetric PSD, so eigvalsh is exact), in float64. Features come from a
network trained on the same data (a "domain FD"), since Inception weights cannot be downloaded here."""
from __future__ import annotations

import torch


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / max(len(f) - 1, 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """a [N, F], b [M, F] features."""
    mu1, s1 = gaussian(a)
    mu2, s2 = gaussian(b)
    r = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh(r @ s2 @ r).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)
