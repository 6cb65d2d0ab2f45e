"""What a unit responds to in the data: its maximally activating probe images (and the patch around the peak), and
the first layer's filters as images."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from core.probe import capture, resolve_one


def first_layer_filters(model: nn.Module) -> Tensor:
    """Weights of the first Conv2d as images [O, C, k, k] in [0, 1] (each filter scaled symmetrically about 0.5)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: no first-layer filters to show")
    w = conv.weight.detach().float().cpu()
    w = w[:, :3] if w.shape[1] >= 3 else w[:, :1]
    return w / (2 * w.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]) + 0.5


class TopActivations(NamedTuple):
    values: Tensor        # [k, U] the unit's maximum over the map, best images first
    indices: Tensor       # [k, U] dataset indices of those images
    positions: Tensor     # [k, U, 2] (row, col) of the maximum in the layer's map
    map_size: tuple       # (h, w) of the layer's map
    mean_sum: Tensor      # [U] sum over the images of the unit's mean activation (for the data set mean)
    count: int            # images seen
    max_sum: Tensor       # [U] sum over the images of the unit's maximum activation (data mean of a max-pooled unit)


def keep_top(values: Tensor, indices: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k best candidates per unit (rows of [N, U] values, indices and [N, U, 2] positions), best first; merges
    the candidates of several batches or ranks exactly."""
    top = values.topk(min(k, len(values)), dim=0)
    return (top.values, indices.gather(0, top.indices),
            positions.gather(0, top.indices[..., None].expand(-1, -1, 2)))


@torch.no_grad()
def top_activations(model: nn.Module, layer: str, batches, units: Sequence[int], k: int = 8,
                    index_offset: int = 0) -> TopActivations:
    """Per unit, the k images of `batches` (normalised image tensors in dataset order, the first at dataset index
    `index_offset`) where the unit's maximum activation is largest (see TopActivations). Vectorised over units and
    images; the running candidates are merged with one top-k per batch; each forward pass stops at `layer`."""
    point = resolve_one(model, layer)

    def maps():
        seen = index_offset
        for x in batches:
            yield (capture(model, None, x, points={point.name: point}).acts[point.name],
                   torch.arange(seen, seen + len(x), device=x.device))
            seen += len(x)
    return top_activations_of_maps(maps(), units, k)


@torch.no_grad()
def top_activations_of_maps(maps, units: Sequence[int], k: int = 8) -> TopActivations:
    """`top_activations` from maps already computed: `maps` yields (the layer's maps [B, U_all, h, w], the images'
    dataset indices [B]) -- e.g. the maps of the epoch's shared probe pass (algorithms/probe_pass.py)."""
    units_t = torch.as_tensor(list(units), dtype=torch.long)
    vals = idx = pos = None
    shape, mean_sum, max_sum, seen = None, 0.0, 0.0, 0
    for a, index in maps:
        a = a[:, units_t.to(a.device)]  # [B, U, h, w]
        shape = a.shape[-2:]
        mean_sum = mean_sum + a.mean((2, 3)).sum(0)
        flat_max, flat_arg = a.flatten(2).max(2)  # [B, U]
        max_sum = max_sum + flat_max.sum(0)
        b_idx = index.to(a.device).long()[:, None].expand_as(flat_max)
        p = torch.stack([flat_arg // shape[1], flat_arg % shape[1]], -1)
        seen += len(a)
        if vals is None:
            vals, idx, pos = flat_max, b_idx, p
        else:
            vals, idx, pos = torch.cat([vals, flat_max]), torch.cat([idx, b_idx]), torch.cat([pos, p])
        vals, idx, pos = keep_top(vals, idx, pos, k)
    if vals is None:
        raise ValueError("no images to search for top activations")
    return TopActivations(vals, idx, pos, tuple(shape), mean_sum, seen, max_sum)


def no_top_activations(units: int, map_size: Sequence[int], device=None) -> TopActivations:
    """The candidates of a rank without probe images (gathered with the others' and never chosen)."""
    return TopActivations(torch.full((0, units), -float("inf"), device=device),
                          torch.zeros(0, units, dtype=torch.long, device=device),
                          torch.zeros(0, units, 2, dtype=torch.long, device=device), tuple(map_size),
                          torch.zeros(units, device=device), 0, torch.zeros(units, device=device))


def crop_patches(images01: Tensor, positions: Tensor, map_size: Sequence[int], patch: int) -> Tensor:
    """Patches [N, C, patch, patch] centred on the input location of each map position (row, col) [N, 2]."""
    N, C, H, W = images01.shape
    cy = ((positions[:, 0].float() + 0.5) * H / map_size[0]).round().long()
    cx = ((positions[:, 1].float() + 0.5) * W / map_size[1]).round().long()
    y0 = (cy - patch // 2).clamp(0, max(0, H - patch))
    x0 = (cx - patch // 2).clamp(0, max(0, W - patch))
    rows = (y0[:, None] + torch.arange(patch)).clamp(max=H - 1)  # [N, p]
    cols = (x0[:, None] + torch.arange(patch)).clamp(max=W - 1)
    n = torch.arange(N)[:, None, None]
    return images01.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
