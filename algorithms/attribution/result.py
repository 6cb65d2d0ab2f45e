"""The typed result of an attribution evaluation (interp/attribution/epoch_NNN/metrics.json)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.results import Result, SchemaError

#: per method: pointing game (with tolerance / strict), energy inside the object mask, deletion AUC, and for the
#: sanity check's method the Spearman rho of its maps before and after randomisation
METRICS = ("pointing_game", "pointing_game_strict", "energy", "deletion_auc", "sanity_spearman")


@dataclass
class AttributionResult(Result):
    """Means over the evaluated probe images, per method; a metric is absent where it was not measured (no object
    masks in the data, a method without deletion curve, not the sanity check's method)."""

    schema = "attribution"
    schema_version = 1

    layer: str
    target: str
    num_images: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    epoch: int | None = None

    def __post_init__(self):
        for method, values in self.metrics.items():
            unknown = set(values) - set(METRICS)
            if unknown:
                raise SchemaError(f"attribution metrics of {method!r}: unknown {sorted(unknown)}; known: {METRICS}")

    def flat(self) -> dict[str, float]:
        """{"<method>/<metric>": value}: the names logged as interp/attribution/<method>/<metric>."""
        return {f"{method}/{key}": value for method, values in self.metrics.items() for key, value in values.items()}

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "layer": self.layer, "target": self.target, "num_images": self.num_images,
                "metrics": {m: dict(v) for m, v in self.metrics.items()}}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "AttributionResult":
        metrics = {str(m): {str(k): (None if v is None else float(v)) for k, v in values.items()}
                   for m, values in (data.get("metrics") or {}).items()}
        epoch = data.get("epoch")
        return cls(layer=str(data["layer"]), target=str(data["target"]), num_images=int(data["num_images"]),
                   metrics=metrics, epoch=None if epoch is None else int(epoch))
