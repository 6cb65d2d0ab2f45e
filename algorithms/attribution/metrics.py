"""How good a map is: does it point at the object (pointing game, energy inside the object mask), and does deleting
the pixels it ranks first destroy the evidence (deletion curve and its area)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from algorithms.attribution.maps import upsample

#: deletion curves are computed every evaluation run: at most this many steps
MAX_DELETION_STEPS = 20


def pointing_game(heat: Tensor, mask: Tensor, tolerance: float = 0.0) -> tuple[Tensor, Tensor]:
    """(hit [B] bool, valid [B] bool). A hit: the map's maximum lies inside the object mask or within `tolerance`
    pixels of it (Zhang et al. 2016 use 15 px at 224 px; tolerance 0 = strictly inside). Images with an empty mask
    are not valid (never hits; a popular evaluation library counts them as hits); a constant map (no maximum) is a
    miss. `heat` [B, h, w] at the mask's resolution, `mask` bool [B, h, w]."""
    B, h, w = mask.shape
    flat, m = heat.flatten(1), mask.flatten(1)
    valid = m.any(1)
    peak = flat.argmax(1)
    informative = flat.amax(1) > flat.amin(1)
    if tolerance > 0:
        ys = torch.arange(h, device=mask.device).repeat_interleave(w)
        xs = torch.arange(w, device=mask.device).repeat(h)
        d2 = (ys[None] - (peak // w)[:, None]) ** 2 + (xs[None] - (peak % w)[:, None]) ** 2  # [B, h*w]
        inside = (d2.masked_fill(~m, h * h + w * w + 1).amin(1).float() <= tolerance ** 2)
    else:
        inside = m.gather(1, peak[:, None]).squeeze(1)
    return inside & informative & valid, valid


def energy_in_mask(heat: Tensor, mask: Tensor) -> Tensor:
    """Share of the positive attribution energy inside the mask, per image [B] (0 for an all-zero map)."""
    pos = heat.clamp_min(0).flatten(1)
    return (pos * mask.flatten(1)).sum(1) / pos.sum(1).clamp_min(1e-12)


def deletion_curve(scores_fn: Callable[[Tensor], Tensor], inputs: Tensor, heat: Tensor, target: Tensor,
                   steps: int = 20, baseline: float = 0.0, max_batch: int = 256,
                   scores: Tensor | None = None) -> Tensor:
    """Class probability while the most important pixels are replaced by `baseline`, most important first
    (Petsiuk et al. 2018): [B, steps + 1], column k after deleting k/steps of the pixels. The steps in between go
    through the model in chunks of at most `max_batch` images. The last column is the same image for every input
    (all pixels replaced): one forward pass of one image. The first is the unmodified inputs: `scores`, their class
    scores when the caller has them already (e.g. from the attribution method's own forward pass), else computed."""
    if not 1 <= steps <= MAX_DELETION_STEPS:
        raise ValueError(f"deletion steps={steps}: use 1..{MAX_DELETION_STEPS} (evaluation runs every epoch)")
    B, C, H, W = inputs.shape
    heat = upsample(heat[:, None], (H, W))[:, 0]
    order = heat.flatten(1).argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H * W, device=order.device).expand(B, -1))
    counts = torch.round(torch.linspace(0, 1, steps + 1, device=inputs.device) * H * W).long()
    fill = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)

    def probs(x: Tensor) -> Tensor:
        return scores_fn(x).float().softmax(1)

    with torch.no_grad():
        first = (scores.float().softmax(1) if scores is not None else probs(inputs)).gather(1, target[:, None])
        last = probs(fill.expand(1, C, H, W))[0, target][:, None]  # every pixel replaced: one image for all
        middle = counts[1:-1]
        curve = [first]
        per_chunk = max(1, max_batch // B)
        for start in range(0, len(middle), per_chunk):
            k = middle[start:start + per_chunk]  # [S]
            keep = (rank[None] >= k[:, None, None]).view(len(k), B, 1, H, W)
            p = probs(torch.where(keep, inputs[None], fill).flatten(0, 1)).view(len(k), B, -1)
            curve.append(p.gather(2, target.view(1, B, 1).expand(len(k), B, 1))[..., 0].T)
        curve.append(last)
    return torch.cat(curve, 1)


def curve_auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves [B, S + 1] sampled evenly on [0, 1]."""
    S = curve.shape[1] - 1
    return (curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * S)
