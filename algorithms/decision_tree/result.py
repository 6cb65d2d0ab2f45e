"""What the decision tree over rationales holds (`DecisionTreeResult`, schema "decision_tree", the epoch folder's
decision_tree.json): the top levels of one tree per predicted class, every node with its sparse decision mode, its
images' mean unit contributions and their concept shares; and the per-depth metrics. Plain data (no torch), so
compare.py reads it without loading torch; algorithms/decision_tree/tree.py builds it and explains new images
with it.

    res = DecisionTreeResult.load(run / "interp/decision_tree/epoch_003/decision_tree.json")
    [res.nodes[m].statement() for m in res.modes("red-circle")]   # "mode 1 (41 images): red 52% + circle 40% ..."
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from core.results import Result

UNINTERPRETABLE = "(uninterpretable)"


@dataclass
class TreeNode:
    """One node. depth 0 = the root of a class's tree (all images predicted as that class); depth 1 = its children,
    the class's decision modes; deeper = the binary merges below them. `weights` {unit: w_j} is the sparse unit-norm
    mode; `contributions` {unit: mean rho_j} over the node's images on the mode's units; `score` = the images' mean
    sum of rho (y - b); `loss` = fit lost per image when this node's two halves share one mode (0 for one image);
    `concepts` = shares of the positive contributions by the units' concepts, largest first."""
    id: int
    cls: int
    depth: int
    parent: int
    children: list[int]
    num_images: int
    loss: float
    score: float
    weights: dict[int, float]
    contributions: dict[int, float]
    concepts: "OrderedDict[str, float]" = field(default_factory=OrderedDict)
    defining_share: float | None = None

    def terms(self, min_share: float = 0.005) -> str:
        return " + ".join(f"{c} {100 * s:.0f}%" for c, s in self.concepts.items() if s >= min_share)

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "class": self.cls, "depth": self.depth, "parent": self.parent,
                "children": list(self.children), "num_images": self.num_images, "loss": self.loss,
                "score": self.score,
                # units are 1-based in files, as in dissection's tables
                "weights": {str(u + 1): w for u, w in self.weights.items()},
                "contributions": {str(u + 1): c for u, c in self.contributions.items()},
                "concepts": dict(self.concepts), "defining_share": self.defining_share}

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> "TreeNode":
        return cls(id=int(d["id"]), cls=int(d["class"]), depth=int(d["depth"]), parent=int(d["parent"]),
                   children=[int(c) for c in d["children"]], num_images=int(d["num_images"]), loss=float(d["loss"]),
                   score=float(d["score"]), weights={int(u) - 1: float(w) for u, w in d["weights"].items()},
                   contributions={int(u) - 1: float(c) for u, c in d["contributions"].items()},
                   concepts=OrderedDict((str(k), float(v)) for k, v in d.get("concepts", {}).items()),
                   defining_share=None if d.get("defining_share") is None else float(d["defining_share"]))


@dataclass
class DecisionTreeResult(Result):
    """The forest (one tree per predicted class, `roots[k]` = node id of class k's root, -1 when no image was
    predicted as k) cut at `max_depth`, and the metrics of algorithms/decision_tree/tree.py."""

    schema = "decision_tree"
    schema_version = 1

    layer: str
    source: str
    sparsity: float
    mode_loss: float
    max_depth: int
    num_images: int
    num_units: int
    class_names: list[str]
    unit_labels: list[str | None]
    roots: list[int]
    nodes: list[TreeNode]
    metrics: dict[str, float] = field(default_factory=dict)
    #: class id -> names of its defining concepts (the data's ground truth; empty without one)
    definitions: dict[int, list[str]] = field(default_factory=dict)
    epoch: int | None = None

    def modes(self, cls: int | str) -> list[int]:
        """Node ids of a class's decision modes (its root's children), largest first."""
        k = self.class_names.index(cls) if isinstance(cls, str) else int(cls)
        root = self.roots[k]
        if root < 0:
            return []
        return sorted(self.nodes[root].children, key=lambda m: -self.nodes[m].num_images)

    def statement(self, node: int) -> str:
        n = self.nodes[node]
        return (f"{self.class_names[n.cls]} mode {node} ({n.num_images} images): "
                f"{n.terms() or '(no positive contribution)'}")

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "layer": self.layer, "source": self.source, "sparsity": self.sparsity,
                "mode_loss": self.mode_loss, "max_depth": self.max_depth, "num_images": self.num_images,
                "num_units": self.num_units, "class_names": list(self.class_names),
                "unit_labels": list(self.unit_labels), "roots": list(self.roots), "metrics": dict(self.metrics),
                "definitions": {str(k): list(v) for k, v in self.definitions.items()},
                "nodes": [n.payload() for n in self.nodes]}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "DecisionTreeResult":
        return cls(layer=str(data["layer"]), source=str(data["source"]), sparsity=float(data["sparsity"]),
                   mode_loss=float(data["mode_loss"]), max_depth=int(data["max_depth"]),
                   num_images=int(data["num_images"]), num_units=int(data["num_units"]),
                   class_names=[str(c) for c in data["class_names"]],
                   unit_labels=[None if u is None else str(u) for u in data["unit_labels"]],
                   roots=[int(r) for r in data["roots"]],
                   nodes=[TreeNode.from_payload(n) for n in data["nodes"]],
                   metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
                   definitions={int(k): [str(c) for c in v] for k, v in data.get("definitions", {}).items()},
                   epoch=None if data.get("epoch") is None else int(data["epoch"]))
