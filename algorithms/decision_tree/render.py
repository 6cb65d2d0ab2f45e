"""The figure of a decision tree (rank 0): one panel per class, its root, its decision modes and (figure_depth 2)
their first split, each node a box with its image count and the concept shares of its positive contributions;
a mode's box is green-edged when its top concept defines the class. matplotlib is imported inside (import time)."""
from __future__ import annotations

import math
from pathlib import Path

from algorithms.decision_tree.result import UNINTERPRETABLE, DecisionTreeResult


def _layout(result: DecisionTreeResult, root: int, depth: int) -> dict[int, tuple[float, int]]:
    """node -> (x, depth): the nodes at the deepest drawn level spread evenly, parents centred over children."""
    pos: dict[int, tuple[float, int]] = {}
    slot = [0.0]

    def place(v: int) -> float:
        n = result.nodes[v]
        kids = n.children if n.depth < depth else []
        if not kids:
            x = slot[0]
            slot[0] += 1.0
        else:
            xs = [place(k) for k in kids]
            x = sum(xs) / len(xs)
        pos[v] = (x, n.depth)
        return x

    place(root)
    return pos


def _label(result: DecisionTreeResult, v: int, terms: int) -> str:
    n = result.nodes[v]
    lines = [f"n={n.num_images}" + (f" loss {n.loss:.3f}" if n.depth == 1 else "")]
    shown = [(c, s) for c, s in n.concepts.items() if s >= 0.05][:terms]
    lines += [f"{c if c != UNINTERPRETABLE else 'uninterp.'} {100 * s:.0f}%" for c, s in shown]
    return "\n".join(lines)


def render_tree(result: DecisionTreeResult, path: Path, depth: int = 2, terms: int = 3, classes: int = 12,
                title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [k for k, r in enumerate(result.roots) if r >= 0][:classes]
    cols = min(3, max(1, len(ks)))
    rows = max(1, math.ceil(len(ks) / cols))
    widths = [len([v for v, (_, d) in _layout(result, result.roots[k], depth).items() if d == depth]) for k in ks]
    panel_w = max(3.6, 0.95 * max(widths + [1]))
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, 1.25 * (depth + 1) * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, ks):
        pos = _layout(result, result.roots[k], depth)
        span = max(x for x, _ in pos.values()) or 1.0
        for v, (x, d) in pos.items():
            n = result.nodes[v]
            if n.parent in pos:
                px, pd = pos[n.parent]
                ax.plot([px / span, x / span], [-pd, -d], color="0.6", lw=0.8, zorder=1)
        for v, (x, d) in pos.items():
            n = result.nodes[v]
            top = next((c for c in n.concepts if c != UNINTERPRETABLE), None)
            edge = "0.3"
            defining = result.definitions.get(n.cls)
            if n.depth == 1 and defining is not None:
                edge = "tab:green" if top in defining else "tab:red"
            ax.text(x / span, -d, _label(result, v, terms), ha="center", va="center", fontsize=7, zorder=2,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=edge, lw=1.4 if n.depth == 1 else 0.8))
        ax.set_xlim(-0.15, 1.15)
        ax.set_ylim(-depth - 0.6, 0.6)
        ax.set_title(f"{result.class_names[k]}: {len(result.nodes[result.roots[k]].children)} modes", fontsize=9)
    m = result.metrics
    fig.suptitle(title or (f"decision tree on {result.layer} ({result.source}); explained by the mode "
                           f"{100 * m.get('explained_d1', 0):.0f}%, modes/class {m.get('modes', 0):.1f}; "
                           f"green/red edge: the mode's top concept does / does not define the class"), fontsize=10)
    # fixed margins: tight_layout measures every text box (several seconds for 12 panels of boxes)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 / fig.get_figheight(), wspace=0.05,
                        hspace=0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

