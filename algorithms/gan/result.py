"""Typed results of the GAN methods: `InterventionResult` (schema "gan_intervention": ablation/insertion of a
concept's top units vs random units) and `LatentDirectionsResult` (schema "gan_directions": concept-share and class
changes along latent directions). GAN dissection itself returns a `DissectionResult` (schema "dissection")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import mean
from typing import Any

import torch

from algorithms.dissection_result import decode_tensor, encode_tensor
from core.results import Result


def _drop(before: float, after: float) -> float:
    """Relative fall of a share (1 = the concept vanished; 0 where it was absent before)."""
    return (before - after) / before if before > 0 else 0.0


@dataclass
class ConceptIntervention:
    concept: int
    name: str
    units: list[int]
    iou: list[float]
    base_share: float                      # E_z share of the concept's pixels in P, unedited
    ablated_share: float                   # ... with the top units set to 0
    inserted_share: float                  # ... with the top units set to k
    inserted_new_share: float              # of the pixels in P where it was absent, the share that now shows it
    random_ablated_share: list[float]      # one per random draw of as many units
    random_inserted_share: list[float]
    random_inserted_new_share: list[float]

    @property
    def ablation_drop(self) -> float:
        return _drop(self.base_share, self.ablated_share)

    @property
    def random_ablation_drop(self) -> float:
        return mean(_drop(self.base_share, s) for s in self.random_ablated_share)

    @property
    def ace(self) -> float:
        """Average causal effect: E[s_c | r_U := k] - E[s_c | r_U := 0]."""
        return self.inserted_share - self.ablated_share

    @property
    def random_ace(self) -> float:
        return mean(i - a for i, a in zip(self.random_inserted_share, self.random_ablated_share))


@dataclass
class InterventionResult(Result):
    schema = "gan_intervention"
    schema_version = 1

    layer: str
    num_units: int
    num_samples: int
    seed: int
    insert_scale: float
    region: list[float] | None
    concepts: list[ConceptIntervention] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        d = asdict(self)
        for row, obj in zip(d["concepts"], self.concepts):
            row.update(ablation_drop=obj.ablation_drop, random_ablation_drop=obj.random_ablation_drop,
                       ace=obj.ace, random_ace=obj.random_ace)
        return d

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int):
        names = set(ConceptIntervention.__dataclass_fields__)
        rows = [ConceptIntervention(**{k: v for k, v in r.items() if k in names}) for r in data.pop("concepts")]
        return cls(concepts=rows, **data)

    @property
    def metrics(self) -> dict[str, float]:
        if not self.concepts:
            return {}
        rows = self.concepts
        return {"ablation_drop": mean(r.ablation_drop for r in rows),
                "random_ablation_drop": mean(r.random_ablation_drop for r in rows),
                "ace": mean(r.ace for r in rows), "random_ace": mean(r.random_ace for r in rows),
                "inserted_new_share": mean(r.inserted_new_share for r in rows),
                "random_inserted_new_share": mean(mean(r.random_inserted_new_share) for r in rows)}

    def table(self) -> tuple[list[str], list[list]]:
        cols = ["concept", "units", "base_share", "ablated_share", "ablation_drop", "random_ablation_drop",
                "inserted_new_share", "ace", "random_ace"]
        rows = [[r.name, len(r.units), r.base_share, r.ablated_share, r.ablation_drop, r.random_ablation_drop,
                 r.inserted_new_share, r.ace, r.random_ace] for r in self.concepts]
        return cols, rows


@dataclass(eq=False)
class LatentDirectionsResult(Result):
    """Concept shares and class probabilities along latent traversals z + alpha n_k, per family of directions
    ("sefa", "random", "axes"): `shares[family]` [D, A, C+1] and `classes[family]` [D, A, K], averaged over z;
    `change[family]` [D, C+1] = max over alpha of |share(alpha) - share(0)|."""
    schema = "gan_directions"
    schema_version = 1

    alphas: list[float]
    concept_names: list[str]
    num_samples: int
    seed: int
    change_threshold: float
    directions: dict[str, torch.Tensor]          # family -> [D, latent_dim]
    shares: dict[str, torch.Tensor]
    classes: dict[str, torch.Tensor]
    eigenvalues: torch.Tensor | None = None      # SeFa's, descending

    def change(self, family: str) -> torch.Tensor:
        s = self.shares[family]
        zero = self.alphas.index(0.0) if 0.0 in self.alphas else len(self.alphas) // 2
        ch = (s - s[:, zero:zero + 1]).abs().amax(dim=1)
        ch[:, 0] = 0
        return ch

    def class_change(self, family: str) -> torch.Tensor:
        """[D]: the largest total-variation distance of the mean class distribution from the one at alpha = 0."""
        p = self.classes[family]
        zero = self.alphas.index(0.0) if 0.0 in self.alphas else len(self.alphas) // 2
        return 0.5 * (p - p[:, zero:zero + 1]).abs().sum(-1).amax(dim=1)

    def concepts_changed(self, family: str) -> torch.Tensor:
        """[D]: how many concepts change by more than `change_threshold` (the disentanglement summary: 1 is a
        direction that edits one thing)."""
        return (self.change(family) > self.change_threshold).sum(dim=1)

    @property
    def metrics(self) -> dict[str, float]:
        out = {}
        for fam in self.shares:
            ch = self.change(fam)
            out[f"{fam}/max_concept_change"] = float(ch.amax(dim=1).mean())
            out[f"{fam}/concepts_changed"] = float(self.concepts_changed(fam).float().mean())
            out[f"{fam}/class_change"] = float(self.class_change(fam).mean())
        return out

    def payload(self) -> dict[str, Any]:
        enc = (lambda d: {k: encode_tensor(v) for k, v in d.items()})
        return {"alphas": self.alphas, "concept_names": self.concept_names, "num_samples": self.num_samples,
                "seed": self.seed, "change_threshold": self.change_threshold,
                "directions": enc(self.directions), "shares": enc(self.shares), "classes": enc(self.classes),
                "eigenvalues": encode_tensor(self.eigenvalues)}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int):
        dec = (lambda d: {k: decode_tensor(v) for k, v in d.items()})
        return cls(alphas=data["alphas"], concept_names=data["concept_names"], num_samples=data["num_samples"],
                   seed=data["seed"], change_threshold=data["change_threshold"],
                   directions=dec(data["directions"]), shares=dec(data["shares"]), classes=dec(data["classes"]),
                   eigenvalues=decode_tensor(data["eigenvalues"]))
