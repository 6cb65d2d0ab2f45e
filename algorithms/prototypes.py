"""ProtoPNet prototypes (Chen et al. 2019): "this looks like that" explanations and prototype quality measured
exactly on ground-truth concept masks. Works on any model that offers `PrototypeModel` (core/protocol.py); the
figures are in algorithms/prototypes_render.py.

    expl = explain(model, x, top=3)                      # top prototypes by contribution to the predicted logit
    stats = push_statistics(model, model.last_push)      # pushed, unique sources, last-layer sparsity, ...
    masks = mask_quality(model, model.last_push, probe, batches, k=10)  # purity, class-object hit rate
    PrototypeQuality.build(epoch, stats, masks).save(run / "quality.json")

Quality metrics (on the probe set's segmentation maps, at the centre pixel of each feature cell):
- purity: for each prototype, the largest share of its k nearest probe patches lying on one same pixel concept
  (PIP-Net's purity with exact masks instead of part annotations); also per concept category;
- class_object_hit_rate: share of pushed prototypes whose source patch (high-activation box) lies on the object of
  the prototype's class (half the box on the object, or half the object in the box);
- unique_sources: distinct source images after push (collapsed prototypes share one);
- last_layer_sparsity: share of last-layer weights with |w| <= 1e-3 max|w|;
- own_class_evidence_share: share of the absolute contributions to the predicted logit that comes from the
  predicted class's own prototypes (mean over images; `evidence_share`).
Under DDP, `mask_quality` takes this rank's shard of the probe set and returns the global values on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from core import distributed as D
from core.results import Result
from models.protopnet_push import NearestPatches, PushResult, k_nearest_patches

SPARSITY_TOLERANCE = 1e-3


# ----- "this looks like that" ----------------------------------------------------------------------------------------
def _bias(model, k: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(model.last_layer, "bias", None)
    return bias.detach().to(like) if bias is not None else like.new_zeros(k)


def class_evidence(model, sim: torch.Tensor, classes: torch.Tensor, top: int) -> dict[str, torch.Tensor]:
    """The decomposition of the logits of `classes` [n] into evidence: logit_c = sum_j sim_j w_cj + b_c, split into
    the `top` prototypes by contribution sim_j w_cj, the rest of c's own prototypes (`own_rest`), the rest of the
    other classes' prototypes (`off_rest`) and the bias; the parts add up to `logit` exactly."""
    weight = model.last_layer.weight.detach()[classes]                           # [n, m]
    contrib = sim * weight
    own = model.prototype_classes.to(classes)[None, :] == classes[:, None]       # [n, m]
    values, order = contrib.topk(min(top, sim.shape[1]), dim=1)
    rest = contrib.scatter(1, order, 0.0)
    bias = _bias(model, model.last_layer.weight.shape[0], sim)[classes]
    return {"class": classes, "prototypes": order, "contribution": values, "similarity": sim.gather(1, order),
            "weight": weight.gather(1, order), "own_rest": (rest * own).sum(dim=1),
            "off_rest": (rest * ~own).sum(dim=1), "bias": bias, "logit": contrib.sum(dim=1) + bias}


def own_class_evidence_share(model, sim: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[n] share of sum_j |sim_j w_cj| (the absolute contributions to the logit of class c) that comes from c's own
    prototypes. 1 when the decision is made of own-class evidence only (the sparse last layer of the paper); the
    dense +1/-0.5 initial layer leaves most of it to other classes' prototypes."""
    contrib = (sim * model.last_layer.weight.detach()[classes]).abs()
    own = model.prototype_classes.to(classes)[None, :] == classes[:, None]
    return (contrib * own).sum(dim=1) / contrib.sum(dim=1).clamp_min(1e-12)


@torch.no_grad()
def explain(model, x: torch.Tensor, top: int = 3) -> dict[str, torch.Tensor]:
    """For images x (normalised): the predicted class and its whole decision (Fig. 2 of the paper, completed): the
    `top` prototypes with the largest contribution sim_j * w[pred, j] to the predicted logit, with their similarity
    maps [n, top, H, W], then the rest of the own-class evidence, the off-class evidence and the bias, which add up to
    the logit; the same for the runner-up class (keys prefixed `runner_up_`)."""
    maps = model.similarity_maps(x) * model.prototype_active[None, :, None, None]  # [n, m, H, W]
    sim = maps.flatten(2).max(dim=2).values          # = similarity of the min distance (monotone decreasing)
    logits = model.last_layer(sim)
    ranked = logits.topk(min(2, logits.shape[1]), dim=1).indices
    pred = ranked[:, 0]
    first = class_evidence(model, sim, pred, top)
    out = {"pred": pred, "logits": logits, **{k: v for k, v in first.items() if k != "class"},
           "maps": maps[torch.arange(len(x))[:, None], first["prototypes"]],
           "own_share": own_class_evidence_share(model, sim, pred)}
    if ranked.shape[1] > 1:
        second = class_evidence(model, sim, ranked[:, 1], top)
        out.update({f"runner_up_{k}": v for k, v in second.items()})
    return out


@torch.no_grad()
def evidence_share(model, batches: Iterable) -> dict[str, float]:
    """`own_class_evidence_share`: the mean over images of own_class_evidence_share for the predicted class, over
    this rank's batches of (normalised images, labels, ...); the global mean on every rank under DDP."""
    device = model.prototype_vectors.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        maps = model.similarity_maps(batch[0].to(device)) * model.prototype_active[None, :, None, None]
        sim = maps.flatten(2).amax(dim=2)
        pred = model.last_layer(sim).argmax(dim=1)
        share = own_class_evidence_share(model, sim, pred)
        total += torch.stack([share.double().sum(), total.new_tensor(float(len(share)))])
    total = D.all_reduce_sum(total)
    return {"own_class_evidence_share": float(total[0] / total[1].clamp_min(1))}


# ----- the push ------------------------------------------------------------------------------------------------------
def last_layer_sparsity(weight: torch.Tensor, tolerance: float = SPARSITY_TOLERANCE) -> float:
    w = weight.detach().abs()
    return float((w <= tolerance * w.max().clamp_min(1e-12)).float().mean())


def push_statistics(model, result: PushResult) -> dict[str, float]:
    """What the latest push did and what the last layer looks like: `pushed`, `unique_sources`,
    `mean_push_distance` (0 when nothing was pushed), `last_layer_sparsity`, `active_prototypes`."""
    pushed = result.pushed
    return {"pushed": float(pushed.sum()), "unique_sources": float(result.image_index[pushed].unique().numel()),
            "mean_push_distance": float(result.distance[pushed].mean()) if pushed.any() else 0.0,
            "last_layer_sparsity": last_layer_sparsity(model.last_layer.weight),
            "active_prototypes": float(model.prototype_active.sum())}


# ----- quality on ground-truth masks ---------------------------------------------------------------------------------
def cell_centres(seg_size: tuple[int, int], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seg-map pixel (row, col) at the centre of each feature cell."""
    sh, sw = seg_size
    rows = ((torch.arange(h) + 0.5) * sh / h).long().clamp(max=sh - 1)
    cols = ((torch.arange(w) + 0.5) * sw / w).long().clamp(max=sw - 1)
    return rows, cols


def concepts_at_patches(centre_labels: torch.Tensor, index: torch.Tensor, position: torch.Tensor,
                        num_concepts: int) -> torch.Tensor:
    """Multi-hot [..., num_concepts + 1] of the pixel concepts at the centres of patches (image index, (h, w)).
    centre_labels: [N, L, H, W] concept ids at every cell centre of every probe image."""
    lab = centre_labels[index, :, position[..., 0], position[..., 1]]  # [..., L]
    hot = torch.zeros(*lab.shape[:-1], num_concepts + 1, dtype=torch.bool)
    hot.scatter_(-1, lab.long(), True)
    hot[..., 0] = False  # 0 = no concept
    return hot


def purity(nearest: NearestPatches, centre_labels: torch.Tensor, num_concepts: int,
           concept_subset: Sequence[int] | None = None) -> torch.Tensor:
    """Per prototype: the largest share of its k nearest patches lying on one same concept, [m]."""
    hot = concepts_at_patches(centre_labels, nearest.image_index, nearest.position, num_concepts)  # [m, k, C+1]
    if concept_subset is not None:
        hot = hot[..., list(concept_subset)]
    share = hot.float().mean(dim=1)                                                           # [m, C']
    return share.max(dim=1).values if share.shape[1] else torch.zeros(share.shape[0])


def class_object_hits(result: PushResult, source_segs: dict[int, torch.Tensor], class_concepts: dict[int, list[int]],
                      seg_size: tuple[int, int]) -> torch.Tensor:
    """[m] 1 where the prototype's source patch lies on the object of its class, 0 where not, NaN where the source
    image has no masks here or the prototype was not pushed. The object = pixels carrying every defining concept of
    the class (in any of the label maps); the patch = the high-activation box; it lies on the object when at least
    half of the box is object or at least half of the object is inside the box."""
    out = torch.full((result.prototypes.shape[0],), float("nan"))
    sy, sx = seg_size[0] / result.image_size, seg_size[1] / result.image_size
    for j in range(result.prototypes.shape[0]):  # m small masks, once per push: not a hot path
        idx = int(result.image_index[j])
        if not bool(result.pushed[j]) or idx not in source_segs:
            continue
        seg = source_segs[idx]                                            # [L, sh, sw]
        need = class_concepts.get(int(result.classes[j]), [])
        if not need:
            continue
        obj = torch.stack([(seg == c).any(dim=0) for c in need]).all(dim=0)
        y0, y1, x0, x1 = result.high_activation_box[j].tolist()
        y0, y1 = int(y0 * sy), max(int(y0 * sy) + 1, round(y1 * sy))
        x0, x1 = int(x0 * sx), max(int(x0 * sx) + 1, round(x1 * sx))
        inside = float(obj[y0:y1, x0:x1].sum())
        box_area, obj_area = (y1 - y0) * (x1 - x0), float(obj.sum())
        out[j] = float(obj_area > 0 and (inside >= 0.5 * box_area or inside >= 0.5 * obj_area))
    return out


@torch.no_grad()
def feature_size(model, image: torch.Tensor) -> tuple[int, int]:
    """(H, W) of the prototype feature map of one normalised image [C, S, S]."""
    device = model.prototype_vectors.device
    return tuple(model.prototype_features(image[None].to(device)).shape[-2:])


def mask_quality(model, result: PushResult, probe, batches: Iterable[dict], k: int = 10,
                 hit_rate: bool = True) -> dict[str, Any]:
    """Purity and class-object hit rate on the ground-truth masks of a concept probe set.

    probe: the probe dataset (its attributes num_concepts, seg_size, max_maps, category_names, concept_categories,
    class_concepts, and its items' masks for the push sources); batches: this rank's batches of probe items (dicts
    with image, label, index, seg). hit_rate: whether the push sources index this probe set (its split is the push
    set's), which the class-object hit rate needs. Returns `purity`, `purity_per_category` ({category: purity}) and,
    where measurable, `class_object_hit_rate` and `hit_rate_coverage` (share of active prototypes it covers)."""
    num_concepts = int(probe.num_concepts)
    h, w = feature_size(model, torch.as_tensor(probe[0]["image"]))
    rows, cols = cell_centres(tuple(probe.seg_size), h, w)
    seen_idx, seen_lab = [], []

    def search_batches():  # (image, label, index) for the search; cell-centre concept labels recorded on the way
        for item in batches:
            seen_idx.append(item["index"].long())
            seen_lab.append(item["seg"][:, :, rows][:, :, :, cols].to(torch.int32))  # gloo has no int16
            yield item["image"], item["label"], item["index"]

    nearest = k_nearest_patches(model, search_batches(), k=k)
    local_idx = torch.cat(seen_idx) if seen_idx else torch.zeros(0, dtype=torch.long)
    local_lab = (torch.cat(seen_lab) if seen_lab else
                 torch.zeros(0, int(getattr(probe, "max_maps", 1)), h, w, dtype=torch.int32))
    dev = model.prototype_vectors.device
    all_idx = D.all_gather_cat(local_idx.to(dev)).cpu()
    all_lab = D.all_gather_cat(local_lab.to(dev)).cpu()
    centre_labels = torch.zeros(int(all_idx.max()) + 1 if len(all_idx) else 0, *all_lab.shape[1:],
                                dtype=torch.int32)
    centre_labels[all_idx] = all_lab
    active = model.prototype_active.cpu()
    out: dict[str, Any] = {"purity": float(purity(nearest, centre_labels, num_concepts)[active].mean()),
                           "purity_per_category": {}}
    for cat in getattr(probe, "category_names", []):
        ids = [i for i, c in enumerate(probe.concept_categories) if c == cat]
        if ids and cat != "scene":
            out["purity_per_category"][cat] = float(
                purity(nearest, centre_labels, num_concepts, ids)[active].mean())
    class_concepts = getattr(probe, "class_concepts", None)
    if class_concepts and hit_rate:
        # the sources' masks come from the whole split (m images), not only the purity subset
        sources = [int(i) for i in result.image_index[result.pushed].unique().tolist() if int(i) < len(probe)]
        segs = {i: torch.as_tensor(probe[i]["seg"]) for i in sources}
        hits = class_object_hits(result, segs, class_concepts, tuple(probe.seg_size))
        hits = hits[active & ~hits.isnan()]
        if len(hits):
            out["class_object_hit_rate"] = float(hits.mean())
            out["hit_rate_coverage"] = float(len(hits) / max(1, int(active.sum())))
    return out


# ----- typed results -------------------------------------------------------------------------------------------------
def _number(v) -> float | None:
    """NaN (no value) is None, as in the JSON file, so that a result equals itself read back."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class PrototypeQuality(Result):
    """The scalars of one push (quality.json): what the push did, the last layer, and (on data with concept masks)
    purity and class-object hit rate. `metrics()` is what the callback logs as interp/prototypes/<name>."""

    schema = "prototype_quality"
    schema_version = 2  # 2: own_class_evidence_share

    epoch: int
    pushed: int
    unique_sources: int
    mean_push_distance: float
    last_layer_sparsity: float
    active_prototypes: int
    purity: float | None = None
    purity_per_category: dict[str, float] = field(default_factory=dict)
    class_object_hit_rate: float | None = None
    hit_rate_coverage: float | None = None
    own_class_evidence_share: float | None = None

    @property
    def unique_source_fraction(self) -> float:
        return self.unique_sources / max(1.0, float(self.pushed))

    @classmethod
    def build(cls, epoch: int, push: dict[str, float], masks: dict[str, Any] | None = None,
              evidence: dict[str, float] | None = None) -> "PrototypeQuality":
        # the push statistics, mask measures and evidence share together are the fields of a saved result
        return cls.from_payload({"epoch": epoch, **push, **(masks or {}), **(evidence or {})}, cls.schema_version)

    def metrics(self) -> dict[str, float]:
        """Flat scalars: pushed, unique_sources, unique_source_fraction, mean_push_distance, last_layer_sparsity,
        active_prototypes, purity, purity_<category>, class_object_hit_rate, hit_rate_coverage (those measured)."""
        out = {"pushed": float(self.pushed), "unique_sources": float(self.unique_sources),
               "mean_push_distance": self.mean_push_distance, "last_layer_sparsity": self.last_layer_sparsity,
               "active_prototypes": float(self.active_prototypes),
               "unique_source_fraction": self.unique_source_fraction}
        if self.purity is not None:
            out["purity"] = self.purity
        for cat, v in self.purity_per_category.items():
            out[f"purity_{cat}"] = float("nan") if v is None else v
        for key in ("class_object_hit_rate", "hit_rate_coverage", "own_class_evidence_share"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, **self.metrics(), "purity_per_category": dict(self.purity_per_category)}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "PrototypeQuality":
        return cls(epoch=int(data["epoch"]), pushed=int(data["pushed"]), unique_sources=int(data["unique_sources"]),
                   mean_push_distance=float(data["mean_push_distance"]),
                   last_layer_sparsity=float(data["last_layer_sparsity"]),
                   active_prototypes=int(data["active_prototypes"]), purity=_number(data.get("purity")),
                   purity_per_category={k: _number(v) for k, v in data.get("purity_per_category", {}).items()},
                   class_object_hit_rate=_number(data.get("class_object_hit_rate")),
                   hit_rate_coverage=_number(data.get("hit_rate_coverage")),
                   own_class_evidence_share=_number(data.get("own_class_evidence_share")))


@dataclass
class PrototypeRecords(Result):
    """Every prototype after one push (prototypes.json): the push entry of the model's push_history and one record
    per prototype (class, source image index, feature position, distance, receptive field, high-activation box,
    activation map), as models.protopnet_push.PushResult.records writes them."""

    schema = "prototypes"
    schema_version = 1

    push: dict[str, Any]
    prototypes: list[dict[str, Any]]

    @classmethod
    def build(cls, push_entry: dict[str, Any], result: PushResult,
              class_names: Sequence[str] | None = None) -> "PrototypeRecords":
        push = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in push_entry.items()}
        return cls(push=push, prototypes=result.records(list(class_names) if class_names else None))

    def payload(self) -> dict[str, Any]:
        return {"push": self.push, "prototypes": self.prototypes}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "PrototypeRecords":
        return cls(push=dict(data["push"]), prototypes=list(data["prototypes"]))
