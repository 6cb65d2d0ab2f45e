"""Prototype projection ("push", Section 2.2 of the paper) and nearest-patch search for ProtoPNet.

`push_prototypes(model, batches)` finds, for every prototype at once, the training patch of its own class nearest to
it: per batch one masked min/argmin over [prototypes, images x positions] (other-class images masked with +inf), a
running best across batches, and under DDP one exchange of each rank's best candidate per prototype, after which
every rank picks the same global best (ties go to the smaller image index, as in a single pass over the set). The
public code loops in Python over prototypes for every batch and rewrites image files on every improvement; this is
the same argmin, with images rendered once afterwards (algorithms/prototypes_render.py).

The model must provide `prototype_features(x) -> z [B, D, H, W]`, `distances(z) -> [B, m, H, W]`,
`prototype_class_identity [m, K]`, `prototype_vectors [m, D]`, `similarity`, `image_size` and `backbone`.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from core import distributed as D
from models.prototype_layer import distance_to_similarity

log = logging.getLogger(__name__)

# the high-activation box holds the pixels above this percentile of the upsampled activation map (public code: 95)
HIGH_ACTIVATION_PERCENTILE = 95.0


def shard_loader(loader: DataLoader) -> DataLoader:
    """This rank's contiguous, unpadded part of an unshuffled loader (the loader itself in one process)."""
    if not D.is_distributed():
        return loader
    part = Subset(loader.dataset, D.shard_indices(len(loader.dataset)))
    return DataLoader(part, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


# ----- receptive fields and boxes -----------------------------------------------------------------------------------
def receptive_field(backbone: nn.Module) -> tuple[float, float, float]:
    """(size, jump, start) of the backbone's output units in input pixels, by the usual layer arithmetic over the
    conv/pool layers in forward order. Residual shortcuts ("downsample") run parallel to the main path and are
    skipped; the 1x1 add-on layers do not change the field."""
    size, jump, start = 1.0, 1.0, 0.5
    for name, m in backbone.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k = _first(m.kernel_size)
            s = _first(m.stride) if m.stride is not None else k
            p = _first(m.padding)
            dil = _first(getattr(m, "dilation", 1))
            k = dil * (k - 1) + 1
            size += (k - 1) * jump
            start += ((k - 1) / 2 - p) * jump
            jump *= s
    return size, jump, start


def _first(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def receptive_field_boxes(positions: torch.Tensor, rf: tuple[float, float, float], image_size: int) -> torch.Tensor:
    """Pixel boxes (y0, y1, x0, x1), end exclusive, of feature positions [n, 2] (h, w)."""
    size, jump, start = rf
    centre = start + positions.double() * jump
    lo = (centre - size / 2).floor().clamp(0, image_size)
    hi = (centre + size / 2).ceil().clamp(0, image_size)
    return torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=1).long()


def upsample_maps(maps: torch.Tensor, image_size: int) -> torch.Tensor:
    """[n, H, W] -> [n, S, S], bicubic like the public code's cv2.resize."""
    return F.interpolate(maps[:, None].float(), size=(image_size, image_size), mode="bicubic",
                         align_corners=False)[:, 0]


def high_activation_boxes(maps: torch.Tensor, image_size: int, percentile: float = HIGH_ACTIVATION_PERCENTILE,
                          chunk: int = 256) -> torch.Tensor:
    """Smallest box (y0, y1, x0, x1), end exclusive, holding every pixel at or above the `percentile` of the
    upsampled activation map; the percentile is numpy's linear interpolation, computed exactly with kthvalue (no
    size limit, unlike torch.quantile)."""
    boxes = []
    for part in maps.split(chunk):
        up = upsample_maps(part, image_size)
        flat = up.flatten(1)
        pos = percentile / 100 * (flat.shape[1] - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo = flat.kthvalue(lo + 1, dim=1).values
        v_hi = flat.kthvalue(hi + 1, dim=1).values
        threshold = v_lo + (pos - lo) * (v_hi - v_lo)
        mask = up >= threshold[:, None, None]
        rows, cols = mask.any(dim=2).int(), mask.any(dim=1).int()
        n = image_size
        boxes.append(torch.stack([rows.argmax(1), n - rows.flip(1).argmax(1),
                                  cols.argmax(1), n - cols.flip(1).argmax(1)], dim=1))
    return torch.cat(boxes).long() if boxes else torch.zeros(0, 4, dtype=torch.long)


# ----- push ----------------------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    """Outcome of one push, per prototype (index j): tensors on the CPU."""

    prototypes: torch.Tensor           # [m, D] new prototype vectors (unchanged where not pushed)
    pushed: torch.Tensor               # [m] bool: a patch of the prototype's class was found
    classes: torch.Tensor              # [m] the prototype's class
    image_index: torch.Tensor          # [m] source image (index into vis_dataset("train")), -1 if not pushed
    position: torch.Tensor             # [m, 2] (h, w) on the feature map, -1 if not pushed
    distance: torch.Tensor             # [m] distance of the old prototype to the chosen patch, inf if not pushed
    activation: torch.Tensor           # [m, H, W] the pushed prototype's similarity map on its source image
    receptive_field: torch.Tensor      # [m, 4] (y0, y1, x0, x1) of the source patch's receptive field
    high_activation_box: torch.Tensor  # [m, 4] (y0, y1, x0, x1) above the 95th percentile of the upsampled map
    image_size: int

    def summary(self) -> dict[str, Any]:
        pushed = self.pushed
        return {"pushed": int(pushed.sum()),
                "mean_distance": float(self.distance[pushed].mean()) if pushed.any() else float("nan"),
                "max_distance": float(self.distance[pushed].max()) if pushed.any() else float("nan"),
                "unique_sources": int(self.image_index[pushed].unique().numel())}

    def records(self, class_names: list[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for j in range(self.prototypes.shape[0]):
            c = int(self.classes[j])
            out.append({"prototype": j, "class": c,
                        "class_name": class_names[c] if class_names and c < len(class_names) else str(c),
                        "pushed": bool(self.pushed[j]), "source_index": int(self.image_index[j]),
                        "position": self.position[j].tolist(),
                        "distance": float(self.distance[j]) if self.pushed[j] else None,
                        "receptive_field": self.receptive_field[j].tolist(),
                        "high_activation_box": self.high_activation_box[j].tolist(),
                        "activation": [[round(float(v), 5) for v in row] for row in self.activation[j]]})
        return out

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PushResult":
        return cls(**{f.name: state[f.name] for f in fields(cls)})


@torch.no_grad()
def push_prototypes(model: nn.Module, batches: Iterable, class_names: list[str] | None = None) -> PushResult:
    """Nearest own-class training patch of every prototype, over `batches` of (images, labels, image indices) (this
    rank's shard under DDP; the result is the global one on every rank). The model is not modified."""
    identity = model.prototype_class_identity.bool()            # [m, K]
    m, dim = model.prototype_vectors.shape
    device = model.prototype_vectors.device
    best_d = torch.full((m,), math.inf, device=device)
    best_idx = torch.full((m,), -1, dtype=torch.long, device=device)
    best_pos = torch.full((m, 2), -1, dtype=torch.long, device=device)
    best_z = None                                                # [m, D, H, W] feature map of the best image
    for batch in batches:
        x, y, index = batch[0].to(device), batch[1].to(device), batch[2].to(device)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= identity.shape[1]):
            raise ValueError(f"push: label {int(y.max())} is outside the model's {identity.shape[1]} classes; "
                             f"model.num_classes must match the data")
        z = model.prototype_features(x)
        d = model.distances(z)                                   # [B, m, H, W]
        b, _, h, w = d.shape
        own = identity[:, y].t()                                 # [B, m]: only the prototype's class competes
        d = d.masked_fill(~own[:, :, None, None], math.inf)
        val, arg = d.transpose(0, 1).reshape(m, -1).min(dim=1)  # over images x positions, earliest on ties
        img, hw = arg // (h * w), arg % (h * w)
        better = val < best_d
        if best_z is None:
            best_z = z.new_zeros(m, dim, h, w)
        best_d = torch.where(better, val, best_d)
        best_idx = torch.where(better, index[img], best_idx)
        best_pos = torch.where(better[:, None], torch.stack([hw // w, hw % w], dim=1), best_pos)
        best_z = torch.where(better[:, None, None, None], z[img], best_z)
    if best_z is None:
        raise ValueError("push: the push set is empty; check datamodule.push_dataloader()")

    # DDP: every rank proposes its best candidate per prototype; the global best is the smallest distance, ties to
    # the smaller image index (what one pass over the whole set would keep). Identical arithmetic on every rank.
    all_d = D.all_gather_cat(best_d[None])                       # [R, m]
    all_idx = D.all_gather_cat(best_idx[None])
    all_pos = D.all_gather_cat(best_pos[None])                   # [R, m, 2]
    h, w = best_z.shape[-2:]
    all_feat = D.all_gather_cat(best_z[torch.arange(m, device=device), :, best_pos[:, 0].clamp_min(0),
                                       best_pos[:, 1].clamp_min(0)][None])  # [R, m, D]
    min_d = all_d.min(dim=0).values
    tie_key = torch.where((all_d == min_d) & (all_idx >= 0), all_idx, torch.iinfo(torch.long).max)
    winner = tie_key.argmin(dim=0)                               # [m] winning rank
    cols = torch.arange(m, device=device)
    pushed = torch.isfinite(min_d)
    new_p = torch.where(pushed[:, None], all_feat[winner, cols], model.prototype_vectors.detach())
    # the pushed prototype's distance map on its source image: only the winning rank holds that feature map
    mine = (winner == D.rank()) & pushed
    dmap = ((best_z - new_p[:, :, None, None]) ** 2).sum(dim=1) * mine[:, None, None]
    dmap = D.all_reduce_sum(dmap)
    activation = distance_to_similarity(dmap, model.similarity) * pushed[:, None, None]

    classes = identity.float().argmax(dim=1)
    if not bool(pushed.all()):
        missing = sorted({int(c) for c in classes[~pushed]})
        names = [class_names[c] if class_names else str(c) for c in missing]
        warnings.warn(f"push: no push image of class(es) {', '.join(names)}; their {int((~pushed).sum())} "
                      f"prototypes keep their current values", stacklevel=2)
    position = all_pos[winner, cols]
    image_size = int(model.image_size)
    rf = receptive_field_boxes(position.clamp_min(0).cpu(), receptive_field(model.backbone), image_size)
    hab = high_activation_boxes(activation.cpu(), image_size)
    return PushResult(prototypes=new_p.cpu(), pushed=pushed.cpu(), classes=classes.cpu(),
                      image_index=torch.where(pushed, all_idx[winner, cols], -1).cpu(),
                      position=torch.where(pushed[:, None], position, -1).cpu(), distance=min_d.cpu(),
                      activation=activation.cpu(), receptive_field=rf, high_activation_box=hab,
                      image_size=image_size)


# ----- nearest patches -----------------------------------------------------------------------------------------------
@dataclass
class NearestPatches:
    distances: torch.Tensor    # [m, k] ascending
    image_index: torch.Tensor  # [m, k]
    position: torch.Tensor     # [m, k, 2] (h, w)
    labels: torch.Tensor       # [m, k] class of the image


@torch.no_grad()
def k_nearest_patches(model: nn.Module, batches: Iterable, k: int, one_per_image: bool = False) -> NearestPatches:
    """The k patches nearest to every prototype over all images of any class (one patch per image, its nearest,
    when one_per_image, as the public code's pruning does). Batches: (images, labels, image indices). Global over
    ranks under DDP."""
    m = model.prototype_vectors.shape[0]
    device = model.prototype_vectors.device
    run_d = torch.empty(m, 0, device=device)
    run_i = torch.empty(m, 0, dtype=torch.long, device=device)
    run_p = torch.empty(m, 0, 2, dtype=torch.long, device=device)
    run_y = torch.empty(m, 0, dtype=torch.long, device=device)
    for batch in batches:
        x, y, index = batch[0].to(device), batch[1].to(device), batch[2].to(device)
        d = model.distances(model.prototype_features(x))  # [B, m, H, W]
        b, _, h, w = d.shape
        if one_per_image:
            val, hw = d.flatten(2).min(dim=2)                                   # [B, m]
            cand_d, cand_hw = val.t(), hw.t()                                   # [m, B]
            cand_img = torch.arange(b, device=device).expand(m, b)
        else:
            cand_d = d.transpose(0, 1).reshape(m, -1)                           # [m, B*H*W]
            flat = torch.arange(b * h * w, device=device)
            cand_img, cand_hw = (flat // (h * w)).expand(m, -1), (flat % (h * w)).expand(m, -1)
        cand_p = torch.stack([cand_hw // w, cand_hw % w], dim=-1)
        run_d = torch.cat([run_d, cand_d], dim=1)
        run_i = torch.cat([run_i, index[cand_img]], dim=1)
        run_p = torch.cat([run_p, cand_p], dim=1)
        run_y = torch.cat([run_y, y[cand_img]], dim=1)
        run_d, run_i, run_p, run_y = _keep_smallest(run_d, run_i, run_p, run_y, k)
    if D.is_distributed():
        short = k - run_d.shape[1]
        if short > 0:  # a small shard: pad to k candidates so every rank sends the same shape
            run_d = torch.cat([run_d, run_d.new_full((m, short), math.inf)], dim=1)
            run_i = torch.cat([run_i, run_i.new_full((m, short), -1)], dim=1)
            run_p = torch.cat([run_p, run_p.new_full((m, short, 2), -1)], dim=1)
            run_y = torch.cat([run_y, run_y.new_full((m, short), -1)], dim=1)
        gathered = [D.all_gather_cat(t.unsqueeze(0)) for t in (run_d, run_i, run_p, run_y)]
        run_d, run_i, run_p, run_y = (g.transpose(0, 1).reshape(m, -1, *g.shape[3:]) for g in gathered)
        run_d, run_i, run_p, run_y = _keep_smallest(run_d, run_i, run_p, run_y, k)
    return NearestPatches(run_d.cpu(), run_i.cpu(), run_p.cpu(), run_y.cpu())


def _keep_smallest(d, i, p, y, k):
    # stable sort on (distance) keeps earlier candidates first on ties, like a single ordered pass
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return (d.gather(1, order), i.gather(1, order), p.gather(1, order[..., None].expand(-1, -1, 2)),
            y.gather(1, order))
