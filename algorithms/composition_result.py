"""What concept composability measures (`CompositionResult`, schema "composability", the epoch folder's
composability.json): per class the concept shares of its positive evidence, the negative share, the top units and the
agreement with the data's defining concepts; the run's metrics; and the Interpretable Basis Decomposition of each
class weight vector. Plain data (no torch), so compare.py reads it without loading torch.

    res = CompositionResult.load(run / "interp/composability/epoch_002/composability.json")
    [c.statement() for c in res.classes]        # "red-circle = circle 41% + red 30% + (uninterpretable) 29%"
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from core.results import Result, SchemaError

UNINTERPRETABLE = "(uninterpretable)"


@dataclass
class ClassComposition:
    name: str
    num_images: int
    concept_shares: "OrderedDict[str, float]"   # positive evidence shares by concept (sum to 1), largest first
    negative_share: float
    top_units: list[tuple[int, str, float]]     # (unit, concept or "(uninterpretable)", share) largest first; 0-based
    concepts: list[int] = field(default_factory=list)   # concept ids with share >= min_share
    precision: float | None = None
    recall: float | None = None

    def terms(self) -> str:
        """"circle 41% + red 30% + (uninterpretable) 29%" (shares below 0.5% left out)."""
        return " + ".join(f"{c} {100 * s:.0f}%" for c, s in self.concept_shares.items() if s >= 0.005)

    def statement(self) -> str:
        return f"{self.name} = {self.terms() or '(no positive evidence)'}"

    def payload(self) -> dict[str, Any]:
        return {"class": self.name, "num_images": self.num_images, "statement": self.statement(),
                "concept_shares": dict(self.concept_shares), "negative_share": self.negative_share,
                # units are 1-based in files, as in dissection's tables
                "top_units": [{"unit": u + 1, "concept": n, "share": s} for u, n, s in self.top_units],
                "concepts": list(self.concepts), "precision": self.precision, "recall": self.recall}

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> "ClassComposition":
        return cls(name=str(d["class"]), num_images=int(d["num_images"]),
                   concept_shares=OrderedDict((str(k), float(v)) for k, v in d["concept_shares"].items()),
                   negative_share=float(d["negative_share"]),
                   top_units=[(int(t["unit"]) - 1, str(t["concept"]), float(t["share"])) for t in d["top_units"]],
                   concepts=[int(c) for c in d.get("concepts") or []],
                   precision=None if d.get("precision") is None else float(d["precision"]),
                   recall=None if d.get("recall") is None else float(d["recall"]))


@dataclass
class ClassBasis:
    """Interpretable Basis Decomposition of one class weight vector (algorithms/ibd.py)."""
    name: str
    statement: str
    concepts: list[str]
    coefficients: list[float]
    shares: list[float]
    residual: float            # ||r|| / ||w||
    residual_energy: float     # ||r||^2 / ||w||^2

    def payload(self) -> dict[str, Any]:
        return {"class": self.name, "statement": self.statement, "concepts": list(self.concepts),
                "coefficients": list(self.coefficients), "shares": list(self.shares), "residual": self.residual,
                "residual_energy": self.residual_energy}

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> "ClassBasis":
        return cls(name=str(d["class"]), statement=str(d["statement"]), concepts=[str(c) for c in d["concepts"]],
                   coefficients=[float(v) for v in d["coefficients"]], shares=[float(v) for v in d["shares"]],
                   residual=float(d["residual"]), residual_energy=float(d["residual_energy"]))


@dataclass
class CompositionResult(Result):
    schema = "composability"
    schema_version = 1

    classes: list[ClassComposition]
    metrics: dict[str, float]
    ibd: list[ClassBasis] = field(default_factory=list)
    layer: str | None = None      # the probe layer whose units the decision sums over
    epoch: int | None = None

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "layer": self.layer, "metrics": dict(self.metrics),
                "classes": [c.payload() for c in self.classes], "ibd": [b.payload() for b in self.ibd]}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "CompositionResult":
        try:
            epoch = data.get("epoch")
            return cls(classes=[ClassComposition.from_payload(c) for c in data["classes"]],
                       metrics={str(k): (None if v is None else float(v)) for k, v in data["metrics"].items()},
                       ibd=[ClassBasis.from_payload(b) for b in data.get("ibd") or []],
                       layer=data.get("layer"), epoch=None if epoch is None else int(epoch))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SchemaError(f"corrupt composability result ({type(err).__name__}: {err})") from err

    def compositions(self) -> "OrderedDict[str, str]":
        """class name -> "concept A 41% + concept B 30% + ..." (what compare.py puts side by side)."""
        return OrderedDict((c.name, c.terms() or "(no positive evidence)") for c in self.classes)
