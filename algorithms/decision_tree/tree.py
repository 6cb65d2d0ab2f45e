"""The decision tree of a network's rationales: build it (one tree per predicted class, algorithms/decision_tree/
build.py), cut it into decision modes, descend it to explain an image, and measure it.

- Modes: a class's root is expanded top-down, always at the child whose merge lost the most fit per image, while
  that loss exceeds `mode_loss`, both halves keep at least `min_images` images and the class has fewer than
  `max_modes` children. This is the paper's stopping rule
  (merge while the gain in fit pays for the prior on one node more) read on the full hierarchy, so that one build
  serves every cut.
- Descent (the paper's "explaining a new image"): from the root of the image's predicted class, at each level go to
  the child whose mode fits the image's rationale best (largest cosine <u_I, w_v>); vectorised over images.
- Per depth d (1 = the modes): `explained_d<d>` = mean share of the score y - b carried by the chosen node's units,
  sum_{j in supp w_v} rho_j / sum_j rho_j (the paper: coarse modes explain less); `fit_d<d>` = mean cosine of the
  rationale with the node's mode; `modes_d<d>` = mean number of distinct nodes reached per class.
- Agreement with the data's class definitions (shapes: class -> defining concepts), over the modes, weighted by
  their images: `mode_defining_share` = share of a mode's positive contributions on units whose dissection concept
  defines the class; `mode_names_defining` = the fraction whose top concept defines the class; both also with the
  units' concept labels shuffled (`*_shuffled`, mean over `shuffles` permutations): the chance level.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from algorithms.decision_tree.build import agglomerate, mode_weights, unit_rationales
from algorithms.decision_tree.rationale import Rationales
from algorithms.decision_tree.result import UNINTERPRETABLE, DecisionTreeResult, TreeNode
from core.errors import ConfigError


@dataclass
class Labels:
    """The units' concept ids [D] (0 = uninterpretable) with the concept names (id 0 unused), and each class's
    defining concept ids (None when the data has no ground truth)."""
    unit_concepts: torch.Tensor
    concept_names: Sequence[str]
    class_concepts: dict[int, Sequence[int]] | None = None

    @classmethod
    def from_dissection(cls, dissection, class_concepts=None) -> "Labels":
        return cls(dissection.unit_concepts(), list(dissection.concept_names), class_concepts)


def check_tree_options(sparsity, mode_loss, max_modes, max_depth, prefix: str = "", min_images: int = 1) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"{prefix}sparsity={sparsity}: the per-image L1 weight lambda must lie in [0, 1) (a unit "
                          f"joins a mode when its mean normalised contribution exceeds it)")
    if not float(mode_loss) >= 0.0:
        raise ConfigError(f"{prefix}mode_loss={mode_loss}: the fit lost per image that splits a mode must be >= 0")
    for name, v in (("max_modes", max_modes), ("max_depth", max_depth), ("min_images", min_images)):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ConfigError(f"{prefix}{name}={v}: must be an integer >= 1")


def _sparse(v: torch.Tensor) -> dict[int, float]:
    idx = v.nonzero().flatten().tolist()
    return {int(j): float(v[j]) for j in idx}


def _class_nodes(merges, cls: int, mode_loss: float, max_modes: int, max_depth: int, first_id: int,
                 sparsity: float, min_images: int) -> list[TreeNode]:
    """The kept top of one class's hierarchy: its root (depth 0), its modes (depth 1) and their merges below, to
    `max_depth`; node ids from `first_id`."""
    n = merges.num_leaves
    counts, loss = merges.counts, merges.loss
    per_image = torch.zeros_like(counts)
    if n > 1:
        per_image[n:] = loss / counts[n:]
    kids = {n + t: (int(merges.left[t]), int(merges.right[t])) for t in range(n - 1)}
    frontier = [merges.root]
    while len(frontier) < max_modes:
        # a split that would leave a mode of fewer than min_images images is an outlier, not a way of deciding
        splittable = [h for h in frontier if h in kids and float(per_image[h]) > mode_loss
                      and min(int(counts[k]) for k in kids[h]) >= min_images]
        if not splittable:
            break
        worst = max(splittable, key=lambda h: float(per_image[h]))
        at = frontier.index(worst)
        frontier[at:at + 1] = list(kids[worst])
    weights = mode_weights(merges.sums, counts, sparsity)
    means = merges.extra / counts[:, None]
    nodes: list[TreeNode] = []

    def make(h: int, depth: int, parent: int) -> TreeNode:
        w = weights[h]
        node = TreeNode(id=first_id + len(nodes), cls=cls, depth=depth, parent=parent, children=[],
                        num_images=int(counts[h]), loss=float(per_image[h]), score=float(means[h, -1]),
                        weights=_sparse(w), contributions=_sparse(means[h, :-1] * (w != 0)))
        nodes.append(node)
        return node

    root = make(merges.root, 0, -1)
    level = []
    for h in frontier:
        child = make(h, 1, root.id)
        root.children.append(child.id)
        level.append((h, child))
    for depth in range(2, max_depth + 1):
        nxt = []
        for h, parent in level:
            for k in kids.get(h, ()):
                child = make(k, depth, parent.id)
                parent.children.append(child.id)
                nxt.append((k, child))
        level = nxt
    return nodes


def dense(result: DecisionTreeResult, attr: str = "weights") -> torch.Tensor:
    """[M, D] of the nodes' sparse `weights` or `contributions`."""
    out = torch.zeros(len(result.nodes), result.num_units)
    for n in result.nodes:
        values = getattr(n, attr)
        if values:
            out[n.id, list(values)] = torch.tensor(list(values.values()))
    return out


def descend(result: DecisionTreeResult, rho: torch.Tensor, pred: torch.Tensor,
            depth: int | None = None) -> torch.Tensor:
    """Node ids [B, depth + 1] (column 0 = the class root, column d = the node chosen at depth d; -1 where the
    image's class has no tree) for rationales rho [B, D] of images predicted as pred [B]."""
    depth = result.max_depth if depth is None else int(depth)
    w = dense(result).to(rho.device)
    width = max([len(n.children) for n in result.nodes] + [1])
    children = torch.full((len(result.nodes) + 1, width), -1, dtype=torch.long, device=rho.device)
    for n in result.nodes:
        if n.children:
            children[n.id, :len(n.children)] = torch.tensor(n.children)
    u = unit_rationales(rho.float())
    roots = torch.tensor(result.roots, dtype=torch.long, device=rho.device)
    path = [roots[pred]]
    for _ in range(depth):
        cur = path[-1]
        cand = children[cur]                                             # [B, width] (row -1 = no node: all -1)
        fit = (u[:, None, :] * w[cand.clamp_min(0)]).sum(-1).masked_fill(cand < 0, float("-inf"))
        best = cand.gather(1, fit.argmax(1, keepdim=True))[:, 0]
        path.append(torch.where((cand >= 0).any(1), best, cur))
    return torch.stack(path, 1)


def depth_metrics(result: DecisionTreeResult, rat: Rationales, path: torch.Tensor) -> dict[str, float]:
    w = dense(result).to(rat.rho.device)
    u = unit_rationales(rat.rho)
    total = rat.rho.sum(1)
    ok_score = total.abs() > 1e-12
    out: dict[str, float] = {}
    for d in range(1, path.shape[1]):
        node = path[:, d]
        has = node >= 0
        wn = w[node.clamp_min(0)]
        carried = (rat.rho * (wn != 0)).sum(1)
        use = has & ok_score
        out[f"explained_d{d}"] = float((carried[use] / total[use]).mean()) if use.any() else 0.0
        out[f"fit_d{d}"] = float((u[has] * wn[has]).sum(1).mean()) if has.any() else 0.0
        pairs = torch.stack([rat.pred[has], node[has]], 1).unique(dim=0)
        classes = rat.pred[has].unique()
        out[f"modes_d{d}"] = float(len(pairs) / max(len(classes), 1))
    return out


def concept_shares(result: DecisionTreeResult, labels: Labels) -> None:
    """Fill every node's `concepts` (shares of its positive mean contributions by concept, largest first) and, with
    class definitions, its `defining_share`."""
    pos = dense(result, "contributions").clamp_min(0).double()
    onehot = torch.zeros(result.num_units, len(labels.concept_names), dtype=torch.float64)
    onehot[torch.arange(result.num_units), labels.unit_concepts.long()] = 1
    by_concept = pos @ onehot
    by_concept = by_concept / by_concept.sum(1, keepdim=True).clamp_min(1e-30)
    for n in result.nodes:
        row = by_concept[n.id]
        n.concepts = OrderedDict((labels.concept_names[c] if c else UNINTERPRETABLE, float(row[c]))
                                 for c in row.argsort(descending=True).tolist() if row[c] > 0)
        if labels.class_concepts and n.cls in labels.class_concepts:
            n.defining_share = float(row[list(labels.class_concepts[n.cls])].sum())


def mode_agreement(result: DecisionTreeResult, labels: Labels, shuffles: int = 100,
                   seed: int = 0) -> dict[str, float]:
    """mode_defining_share, mode_names_defining and their shuffled-label chance levels (see the module doc)."""
    if not labels.class_concepts:
        return {}
    modes = [m for r in result.roots if r >= 0 for m in result.nodes[r].children
             if result.nodes[m].cls in labels.class_concepts]
    if not modes:
        return {}
    pos = dense(result, "contributions")[modes].clamp_min(0).double()             # [M, D]
    weight = torch.tensor([result.nodes[m].num_images for m in modes], dtype=torch.float64)
    n_concepts = len(labels.concept_names)
    defining = torch.zeros(len(modes), n_concepts, dtype=torch.bool)
    for i, m in enumerate(modes):
        defining[i, list(labels.class_concepts[result.nodes[m].cls])] = True
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.arange(result.num_units)] +
                        [torch.randperm(result.num_units, generator=g) for _ in range(shuffles)])
    concepts = labels.unit_concepts.long()[perms]                                  # [P+1, D], row 0 = true
    onehot = torch.zeros(len(perms), result.num_units, n_concepts, dtype=torch.float64)
    onehot.scatter_(2, concepts[..., None], 1.0)
    by_concept = torch.einsum("md,pdc->pmc", pos, onehot)                          # [P+1, M, C]
    share = by_concept / by_concept.sum(2, keepdim=True).clamp_min(1e-30)
    defining_share = (share * defining).sum(2)                                      # [P+1, M]
    named = by_concept[..., 1:].max(2)
    top = named.indices + 1
    names_defining = defining.expand(len(perms), -1, -1).gather(2, top[..., None])[..., 0] & (named.values > 0)
    mean = (lambda v: (v.double() * weight).sum(-1) / weight.sum())
    ds, nd = mean(defining_share), mean(names_defining)
    return {"mode_defining_share": float(ds[0]), "mode_defining_share_shuffled": float(ds[1:].mean()),
            "mode_names_defining": float(nd[0]), "mode_names_defining_shuffled": float(nd[1:].mean())}


def build_tree(rat: Rationales, sparsity: float = 0.05, mode_loss: float = 0.005, max_modes: int = 8,
               min_images: int = 3, max_depth: int = 3, labels: Labels | None = None,
               class_names: Sequence[str] | None = None,
               num_classes: int | None = None, shuffles: int = 100) -> DecisionTreeResult:
    """The decision tree of `rat` (one tree per predicted class), its modes, per-depth metrics (by descending the
    tree with the same images) and, with `labels`, the concept shares of every node and the agreement of the modes
    with the class definitions."""
    check_tree_options(sparsity, mode_loss, max_modes, max_depth, min_images=min_images)
    k = num_classes or (len(class_names) if class_names is not None else int(rat.pred.max()) + 1)
    class_names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    u = unit_rationales(rat.rho.float())
    extra = torch.cat([rat.rho.float(), rat.rho.float().sum(1, keepdim=True)], 1)
    nodes: list[TreeNode] = []
    roots = [-1] * k
    for c in rat.pred.unique().tolist():
        idx = (rat.pred == c).nonzero().flatten()
        merges = agglomerate(u[idx], float(sparsity), extra[idx])
        part = _class_nodes(merges, int(c), float(mode_loss), int(max_modes), int(max_depth), len(nodes),
                            float(sparsity), int(min_images))
        roots[int(c)] = part[0].id
        nodes.extend(part)
    unit_labels = [None] * rat.rho.shape[1]
    if labels is not None:
        if len(labels.unit_concepts) != rat.rho.shape[1]:
            raise ValueError(f"the dissection labels {len(labels.unit_concepts)} units but layer {rat.layer!r} "
                             f"has {rat.rho.shape[1]}: dissect the layer the rationales are taken at")
        unit_labels = [labels.concept_names[c] if c else None for c in labels.unit_concepts.tolist()]
    result = DecisionTreeResult(layer=rat.layer, source=rat.source, sparsity=float(sparsity),
                                mode_loss=float(mode_loss), max_depth=int(max_depth), num_images=len(rat),
                                num_units=int(rat.rho.shape[1]), class_names=class_names, unit_labels=unit_labels,
                                roots=roots, nodes=nodes)
    path = descend(result, rat.rho, rat.pred)
    metrics = depth_metrics(result, rat, path)
    metrics["modes"] = metrics.pop("modes_d1")
    metrics["residual"] = float(rat.residual.abs().mean())
    if labels is not None:
        concept_shares(result, labels)
        result.definitions = {int(k): [labels.concept_names[c] for c in v]
                              for k, v in (labels.class_concepts or {}).items()}
        metrics.update(mode_agreement(result, labels, shuffles))
    result.metrics = metrics
    return result


@dataclass
class Explanation:
    """One image's descent: the node chosen at each depth, the share of its score each carries, and its own
    contributions on the deepest node's units grouped by concept (shares of y - b)."""
    path: list[int]
    explained: list[float]
    concepts: "OrderedDict[str, float]"

    def statement(self, result: DecisionTreeResult) -> str:
        node = result.nodes[self.path[-1]]
        terms = " + ".join(f"{c} {100 * s:.0f}%" for c, s in self.concepts.items() if abs(s) >= 0.005)
        return f"{result.class_names[node.cls]} via node {node.id} (depth {node.depth}): {terms}"


def explain(result: DecisionTreeResult, rho: torch.Tensor, pred: torch.Tensor, depth: int | None = None,
            labels: Labels | None = None) -> list[Explanation]:
    """Explain new images (rationales rho [B, D] for predicted classes pred [B]) by descending the tree."""
    path = descend(result, rho, pred, depth)
    w = dense(result).to(rho.device)
    total = rho.sum(1, keepdim=True)
    safe = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
    share = rho / safe                                                             # [B, D]
    onehot = None
    if labels is not None:
        onehot = torch.zeros(rho.shape[1], len(labels.concept_names), device=rho.device)
        onehot[torch.arange(rho.shape[1]), labels.unit_concepts.long().to(rho.device)] = 1
    out = []
    for b in range(len(rho)):
        nodes = [int(v) for v in path[b, 1:] if v >= 0]
        if not nodes:
            out.append(Explanation([], [], OrderedDict()))
            continue
        explained = [float((share[b] * (w[v] != 0)).sum()) for v in nodes]
        on_mode = share[b] * (w[nodes[-1]] != 0)
        if onehot is not None:
            grouped = on_mode @ onehot
            names = [labels.concept_names[c] if c else UNINTERPRETABLE for c in range(len(labels.concept_names))]
        else:
            grouped, names = on_mode, [f"unit {j + 1}" for j in range(rho.shape[1])]
        order = grouped.abs().argsort(descending=True).tolist()
        out.append(Explanation(nodes, explained, OrderedDict((names[c], float(grouped[c])) for c in order
                                                              if grouped[c] != 0)))
    return out
