"""What network dissection measures for one layer (`DissectionResult`, schema "dissection") and the results of one
dissection run over several layers (`DissectionEpoch`, schema "dissection_epoch", the epoch folder's
dissection.json). Both round-trip through JSON without loss: tensors are stored with their dtype and shape, the
[U, C+1] intersection counts as their nonzero entries and the [C+1, U] concept feature sums as their nonzero rows.

    res = DissectionEpoch.load(run / "interp/dissection/epoch_002/dissection.json").layers["backbone.conv4"]
    res.summary(); res.labels(); res.iou; res.concept_vectors()
"""
from __future__ import annotations

import csv
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from algorithms.dissection_stats import IOU_THRESHOLD, TOP_QUANTILE
from core.results import Result, SchemaError


# ----- tensors in JSON ----------------------------------------------------------------------------------------------

def _number(v: float):
    # JSON has no inf/nan (core.io would write null): the padding scores of short top-image lists are -inf
    return v if math.isfinite(v) else repr(v)


def encode_tensor(t: torch.Tensor | None, layout: str = "dense") -> dict[str, Any] | None:
    """A tensor as JSON: dtype, shape and the values; layout "coo" keeps only the nonzero entries (flat indices),
    "rows" only the nonzero rows of a matrix."""
    if t is None:
        return None
    t = t.detach().cpu()
    out: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "layout": layout}
    if layout == "coo":
        flat = t.reshape(-1)
        index = flat.nonzero().flatten()
        out.update(index=index.tolist(), values=[_number(v) for v in flat[index].tolist()])
    elif layout == "rows":
        rows = (t != 0).any(dim=1).nonzero().flatten()
        out.update(rows=rows.tolist(), values=[_number(v) for v in t[rows].reshape(-1).tolist()])
    else:
        values = t.reshape(-1).tolist()
        out["values"] = values if not t.is_floating_point() else [_number(v) for v in values]
    return out


def decode_tensor(d: dict[str, Any] | None) -> torch.Tensor | None:
    if d is None:
        return None
    try:
        dtype = getattr(torch, d["dtype"])
        shape = [int(s) for s in d["shape"]]
        values = [float(v) if isinstance(v, str) else v for v in d["values"]]
        layout = d.get("layout", "dense")
        if layout == "dense":
            return torch.tensor(values, dtype=dtype).reshape(shape)
        out = torch.zeros(shape, dtype=dtype)
        if layout == "coo":
            out.view(-1)[torch.tensor(d["index"], dtype=torch.long)] = torch.tensor(values, dtype=dtype)
        elif layout == "rows":
            rows = torch.tensor(d["rows"], dtype=torch.long)
            out[rows] = torch.tensor(values, dtype=dtype).reshape(len(rows), *shape[1:])
        else:
            raise SchemaError(f"unknown tensor layout {layout!r}")
        return out
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise SchemaError(f"corrupt tensor entry ({type(err).__name__}: {err})") from err


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    return a == b


# ----- one layer ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class DissectionResult(Result):
    """Everything dissection measured for one layer; tensors on the CPU. Concept columns are indexed by concept id
    (column 0 = unlabelled, never a label)."""
    schema = "dissection"
    schema_version = 1

    layer: str
    thresholds: torch.Tensor          # [U] T_u
    intersection: torch.Tensor        # [U, C+1] sum over images of |M_u & L_c|
    unit_area: torch.Tensor           # [U] sum over images of |M_u|
    concept_area: torch.Tensor        # [C+1] sum over images of |L_c|
    concept_names: list[str]
    concept_categories: list[str]
    category_names: list[str]
    num_images: int
    map_size: tuple[int, int]
    seg_size: tuple[int, int]
    top_images: torch.Tensor          # [U, n_top] probe indices of the maximally activating images (-1: none)
    top_scores: torch.Tensor          # [U, n_top] their max activation (-inf: none)
    iou_threshold: float = IOU_THRESHOLD
    quantile: float = TOP_QUANTILE
    concept_feature_sum: torch.Tensor | None = None   # [C+1, U] sum of features weighted by concept coverage
    concept_weight: torch.Tensor | None = None        # [C+1] total coverage weight
    feature_sum: torch.Tensor | None = None           # [U] sum of features over all locations
    num_locations: int = 0
    extra: dict = field(default_factory=dict)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(_same(getattr(self, f.name), getattr(other, f.name))
                                                 for f in fields(self))

    __hash__ = None  # mutable

    @property
    def num_units(self) -> int:
        return int(self.thresholds.numel())

    @property
    def union(self) -> torch.Tensor:
        return self.unit_area[:, None] + self.concept_area[None, :] - self.intersection

    @property
    def iou(self) -> torch.Tensor:
        """[U, C+1]; 0 where the union is empty; column 0 (unlabelled) is 0."""
        union = self.union
        iou = torch.where(union > 0, self.intersection / union.clamp_min(1), torch.zeros_like(union))
        iou[:, 0] = 0
        return iou

    @property
    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(best concept id [U], its IoU [U]); ties go to the lowest id."""
        iou = self.iou
        score, concept = iou.max(dim=1)
        return concept, score

    @property
    def interpretable(self) -> torch.Tensor:
        concept, score = self.best
        return (score >= self.iou_threshold) & (concept > 0)

    def unit_labels(self) -> list[str | None]:
        """Per unit: its concept name when interpretable, else None."""
        concept, _ = self.best
        ok = self.interpretable
        return [self.concept_names[c] if good else None for c, good in zip(concept.tolist(), ok.tolist())]

    def unit_concepts(self) -> torch.Tensor:
        """Per unit: its concept id when interpretable, else 0."""
        concept, _ = self.best
        return torch.where(self.interpretable, concept, torch.zeros_like(concept))

    def summary(self) -> dict[str, float]:
        """interpretable_units, unique_concepts, mean IoU of the best concepts and units per category."""
        concept, score = self.best
        ok = self.interpretable
        labelled = concept[ok].tolist()
        out = {"interpretable_units": float(ok.sum()), "unique_concepts": float(len(set(labelled))),
               "interpretable_fraction": float(ok.float().mean()) if self.num_units else 0.0,
               "mean_best_iou": float(score.mean()) if self.num_units else 0.0}
        for cat in self.category_names:
            out[f"category/{cat}"] = float(sum(self.concept_categories[c] == cat for c in labelled))
        return out

    def labels(self) -> list[dict[str, Any]]:
        """One record per unit in NetDissect's result-table layout: unit (1-based, as NetDissect numbers them;
        channel = unit - 1), category, label, score (IoU of the best concept), then per category the best concept of
        that category with its truth (concept area), activation (unit area), intersect and iou."""
        iou = self.iou
        concept, score = self.best
        cats = torch.tensor([self.category_names.index(c) if c in self.category_names else -1
                             for c in self.concept_categories])
        rows = []
        per_cat = {}
        for k, cat in enumerate(self.category_names):
            cols = (cats == k).nonzero().flatten()
            if len(cols):
                s, j = iou[:, cols].max(dim=1)
                per_cat[cat] = (cols[j], s)
        for u in range(self.num_units):
            c = int(concept[u])
            row = {"unit": u + 1, "category": self.concept_categories[c] if c else "",
                   "label": self.concept_names[c] if c else "-", "score": float(score[u]),
                   "interpretable": bool(score[u] >= self.iou_threshold and c > 0),
                   "threshold": float(self.thresholds[u])}
            for cat in self.category_names:
                if cat in per_cat:
                    cc, s = int(per_cat[cat][0][u]), float(per_cat[cat][1][u])
                    row.update({f"{cat}-label": self.concept_names[cc], f"{cat}-truth": float(self.concept_area[cc]),
                                f"{cat}-activation": float(self.unit_area[u]),
                                f"{cat}-intersect": float(self.intersection[u, cc]), f"{cat}-iou": s})
            rows.append(row)
        return rows

    def csv_columns(self) -> list[str]:
        cols = ["unit", "category", "label", "score"]
        for cat in self.category_names:
            if any(c == cat for c in self.concept_categories):
                cols += [f"{cat}-{k}" for k in ("label", "truth", "activation", "intersect", "iou")]
        return cols + ["interpretable", "threshold"]

    def write_csv(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.csv_columns(), extrasaction="ignore")
            w.writeheader()
            for row in self.labels():
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def concept_vectors(self) -> torch.Tensor | None:
        """[C+1, U] unit-norm concept directions in this layer's per-location feature space: the mean feature at the
        concept's locations minus the mean feature over all locations (a class-mean linear direction; row 0 and
        concepts never seen are 0). Used by Interpretable Basis Decomposition (algorithms/ibd.py)."""
        if self.concept_feature_sum is None or not self.num_locations:
            return None
        mean_all = self.feature_sum / self.num_locations
        w = self.concept_weight[:, None]
        q = torch.where(w > 0, self.concept_feature_sum / w.clamp_min(1e-12) - mean_all, torch.zeros_like(
            self.concept_feature_sum))
        q[0] = 0
        return F.normalize(q, dim=1)

    # ----- JSON -------------------------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        concept, score = self.best
        ok = self.interpretable
        return {
            "layer": self.layer, "num_units": self.num_units, "num_images": self.num_images,
            "map_size": list(self.map_size), "seg_size": list(self.seg_size),
            "threshold_rule": f"exact {1 - self.quantile:g} quantile per unit over raw {self.map_size[0]}x"
                              f"{self.map_size[1]} maps (before upsampling), as torch.quantile",
            "quantile": self.quantile, "iou_threshold": self.iou_threshold, "summary": self.summary(),
            # readable per-unit labels (derived from the counts below; not read back)
            "units": [{"unit": u + 1, "label": self.concept_names[c] if c else "-",
                       "category": self.concept_categories[c] if c else "", "score": s, "interpretable": i}
                      for u, (c, s, i) in enumerate(zip(concept.tolist(), score.tolist(), ok.tolist()))],
            "concept_names": list(self.concept_names), "concept_categories": list(self.concept_categories),
            "category_names": list(self.category_names),
            "thresholds": encode_tensor(self.thresholds), "intersection": encode_tensor(self.intersection, "coo"),
            "unit_area": encode_tensor(self.unit_area), "concept_area": encode_tensor(self.concept_area),
            "top_images": encode_tensor(self.top_images), "top_scores": encode_tensor(self.top_scores),
            "concept_feature_sum": encode_tensor(self.concept_feature_sum, "rows"),
            "concept_weight": encode_tensor(self.concept_weight), "feature_sum": encode_tensor(self.feature_sum),
            "num_locations": self.num_locations, "extra": self.extra,
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "DissectionResult":
        try:
            return cls(
                layer=str(data["layer"]), thresholds=decode_tensor(data["thresholds"]),
                intersection=decode_tensor(data["intersection"]), unit_area=decode_tensor(data["unit_area"]),
                concept_area=decode_tensor(data["concept_area"]), concept_names=list(data["concept_names"]),
                concept_categories=list(data["concept_categories"]), category_names=list(data["category_names"]),
                num_images=int(data["num_images"]), map_size=tuple(int(v) for v in data["map_size"]),
                seg_size=tuple(int(v) for v in data["seg_size"]), top_images=decode_tensor(data["top_images"]),
                top_scores=decode_tensor(data["top_scores"]), iou_threshold=float(data["iou_threshold"]),
                quantile=float(data["quantile"]), concept_feature_sum=decode_tensor(data.get("concept_feature_sum")),
                concept_weight=decode_tensor(data.get("concept_weight")),
                feature_sum=decode_tensor(data.get("feature_sum")), num_locations=int(data.get("num_locations", 0)),
                extra=dict(data.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as err:
            raise SchemaError(f"corrupt dissection result ({type(err).__name__}: {err})") from err


# ----- one run over several layers ----------------------------------------------------------------------------------

@dataclass
class DissectionEpoch(Result):
    """The layers dissected at one epoch (dissection.json of the epoch folder), in the order they were given."""
    schema = "dissection_epoch"
    schema_version = 1

    layers: "OrderedDict[str, DissectionResult]"
    epoch: int | None = None

    def __getitem__(self, layer: str) -> DissectionResult:
        return self.layers[layer]

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "layers": {name: r.to_json() for name, r in self.layers.items()}}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "DissectionEpoch":
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise SchemaError("corrupt dissection_epoch result: no 'layers' mapping")
        epoch = data.get("epoch")
        return cls(OrderedDict((name, DissectionResult.from_json(d)) for name, d in layers.items()),
                   None if epoch is None else int(epoch))
