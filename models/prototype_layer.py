"""The prototype layer of ProtoPNet (Chen et al. 2019): squared-L2 distances between every prototype and every 1x1
patch of the add-on features, the log similarity, and the exact masked minimum. Shared by the model
(models/protopnet.py) and the push (models/protopnet_push.py), which therefore never import each other."""
from __future__ import annotations

import math

import torch
from torch import nn

SIMILARITIES = ("log", "linear")
# eps of the log similarity log((d + 1) / (d + eps)) (Eq. 1 of the paper; 1e-4 in the public code)
LOG_SIMILARITY_EPS = 1e-4


def squared_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||z_hw - p_j||^2 for every patch and prototype: z [B, D, H, W], prototypes [m, D] -> [B, m, H, W].

    Expanded as ||z||^2 - 2 z.p + ||p||^2 (one einsum instead of m convolutions) and clamped at 0, because the
    expansion can go slightly negative in floating point where the true distance is 0 (right after a push)."""
    z2 = (z * z).sum(dim=1, keepdim=True)
    zp = torch.einsum("bdhw,md->bmhw", z, prototypes)
    p2 = (prototypes * prototypes).sum(dim=1).view(1, -1, 1, 1)
    return (z2 - 2 * zp + p2).clamp_min(0)


def distance_to_similarity(d: torch.Tensor, kind: str = "log") -> torch.Tensor:
    if kind == "log":
        return torch.log((d + 1) / (d + LOG_SIMILARITY_EPS))
    return -d


def masked_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """min over the last dim of `values` where `mask` is true. +inf fill keeps it exact for any distance; the public
    code's max(max_dist - d) form silently breaks once a distance exceeds max_dist = D."""
    return values.masked_fill(~mask, math.inf).min(dim=-1).values


class SimilarityMaps(nn.Module):
    """Distance maps [B, m, H, W] -> per-patch similarity maps: a module of its own so that probes (dissection,
    composability) see one channel per prototype, high where the prototype is present."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return distance_to_similarity(d, self.kind)
