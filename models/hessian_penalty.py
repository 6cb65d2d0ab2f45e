"""The Hessian penalty (Peebles et al., ECCV 2020, Eq. 3-5): penalise the off-diagonal entries of the Hessian of
G(z) w.r.t. z, so that each latent coordinate controls one factor. Unbiased estimate: the variance over Rademacher
vectors v of v^T H v, with v^T H v from a central finite difference (G(z + eps v) - 2 G(z) + G(z - eps v)) / eps^2,
then the max over output elements (the paper's reduction), averaged over the batch."""
from __future__ import annotations

from typing import Callable

import torch


def hessian_penalty(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, k: int = 2, eps: float = 0.1,
                    reduction: str = "max", g0: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable penalty of fn at z [B, latent]; k >= 2 Rademacher samples; g0 = fn(z) when already
    computed."""
    if k < 2:
        raise ValueError("hessian_penalty needs k >= 2 Rademacher samples (it is a variance)")
    g0 = fn(z) if g0 is None else g0
    v = torch.randint(0, 2, (k, *z.shape), device=z.device).to(z.dtype) * 2 - 1
    plus = fn((z[None] + eps * v).reshape(-1, *z.shape[1:]))
    minus = fn((z[None] - eps * v).reshape(-1, *z.shape[1:]))
    second = (plus.view(k, *g0.shape) - 2 * g0[None] + minus.view(k, *g0.shape)) / eps ** 2   # v^T H v per output
    var = second.var(dim=0, unbiased=True).reshape(g0.shape[0], -1)
    return (var.amax(dim=1) if reduction == "max" else var.mean(dim=1)).mean()
