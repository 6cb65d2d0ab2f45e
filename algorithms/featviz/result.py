"""The typed result of a feature-visualization run (interp/featviz/epoch_NNN/featviz.json)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor

from algorithms.featviz.dataset_examples import TopActivations
from core.results import Result

# A unit that is exactly 0 (off after its ReLU) on the initial grey image has gain final / GAIN_FLOOR.
GAIN_FLOOR = 1e-6


@dataclass
class FeatvizUnit:
    """One optimised batch element: a unit (channel `index` of the layer) or a class (score `index`). initial /
    final: the unit's activation (its map's spatial mean, or its maximum where the result's `pooling` is "max"; the
    class score) on the untransformed initial and optimised image; data_mean: the unit's mean activation over the
    probe images (pooled the same way); gain = final / max(initial, GAIN_FLOOR) (units only)."""

    kind: str
    index: int
    initial: float
    final: float
    name: str | None = None
    data_mean: float | None = None
    gain: float | None = None


@dataclass
class TopPatches:
    """Per unit (outer lists, in unit order) the k probe images with the largest maximum activation, best first."""

    dataset_index: list[list[int]]
    position: list[list[list[int]]]     # (row, col) of the maximum in the layer's map
    activation: list[list[float]]
    map_size: list[int]


@dataclass
class FeatvizResult(Result):
    schema = "featviz"
    # 2: `pooling` (how the units' maps are read: "mean" or "max"); version 1 results were all "mean"
    schema_version = 2

    layer: str
    steps: int
    parametrisation: str
    metrics: dict[str, float]
    units: list[FeatvizUnit]
    top_patches: TopPatches | None = None
    epoch: int | None = None
    pooling: str = "mean"

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "layer": self.layer, "steps": self.steps,
                "parametrisation": self.parametrisation, "pooling": self.pooling, "metrics": dict(self.metrics),
                "units": [vars(u).copy() for u in self.units],
                "top_patches": None if self.top_patches is None else vars(self.top_patches).copy()}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "FeatvizResult":
        opt = lambda v, t: None if v is None else t(v)  # noqa: E731
        units = [FeatvizUnit(kind=str(u["kind"]), index=int(u["index"]), initial=float(u["initial"]),
                             final=float(u["final"]), name=opt(u.get("name"), str),
                             data_mean=opt(u.get("data_mean"), float), gain=opt(u.get("gain"), float))
                 for u in data.get("units", [])]
        tp = data.get("top_patches")
        top = None if tp is None else TopPatches(
            dataset_index=[[int(i) for i in row] for row in tp["dataset_index"]],
            position=[[[int(c) for c in p] for p in row] for row in tp["position"]],
            activation=[[float(a) for a in row] for row in tp["activation"]],
            map_size=[int(s) for s in tp["map_size"]])
        epoch = data.get("epoch")
        return cls(layer=str(data["layer"]), steps=int(data["steps"]), parametrisation=str(data["parametrisation"]),
                   metrics={str(k): opt(v, float) for k, v in (data.get("metrics") or {}).items()}, units=units,
                   top_patches=top, epoch=opt(epoch, int), pooling=str(data.get("pooling", "mean")))

    def unit_gains(self) -> list[float]:
        return [u.gain for u in self.units if u.kind == "unit"]


def featviz_result(layer: str, jobs: Sequence[tuple[str, int]], values: Tensor, data_mean: Tensor,
                   top: TopActivations | None, *, steps: int, parametrisation: str,
                   class_names: Sequence[str] | None = None, epoch: int | None = None,
                   pooling: str = "mean") -> FeatvizResult:
    """The result of a run from its parts: `values` [N, 2] (initial, final) per job, `data_mean` [U] the units' mean
    activation over the probe images, `top` the merged top activations [k, U], `pooling` how the unit activations
    were read from their maps ("mean" or "max"). Metrics: activation_gain_{min,median} (final / initial unit
    activation, the initial floored at GAIN_FLOOR), activation_final_mean and activation_vs_data_min (final / the
    unit's data mean)."""
    unit_rows = [i for i, j in enumerate(jobs) if j[0] == "unit"]
    gains = (values[unit_rows, 1] / values[unit_rows, 0].clamp_min(GAIN_FLOOR)).cpu()
    vs_data = (values[unit_rows, 1] / data_mean.clamp_min(GAIN_FLOOR)).cpu()
    metrics = {"activation_gain_min": float(gains.min()), "activation_gain_median": float(gains.median()),
               "activation_final_mean": float(values[unit_rows, 1].mean()),
               "activation_vs_data_min": float(vs_data.min())}
    units = [FeatvizUnit(kind=kind, index=int(v), name=(class_names[v] if kind == "class" and class_names else None),
                         initial=float(values[i, 0]), final=float(values[i, 1]),
                         data_mean=float(data_mean[v]) if kind == "unit" else None,
                         gain=(float(values[i, 1] / max(float(values[i, 0]), GAIN_FLOOR)) if kind == "unit"
                               else None))
             for i, (kind, v) in enumerate(jobs)]
    patches = None
    if top is not None:
        patches = TopPatches(dataset_index=top.indices.T.tolist(), position=top.positions.transpose(0, 1).tolist(),
                             activation=top.values.T.tolist(), map_size=list(top.map_size))
    return FeatvizResult(layer=layer, steps=int(steps), parametrisation=parametrisation, metrics=metrics, units=units,
                         top_patches=patches, epoch=epoch, pooling=pooling)
