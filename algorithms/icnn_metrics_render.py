"""The figure of algorithms/icnn_metrics.py (plain code; matplotlib imported when drawing): one row per filter, its
top images with the receptive-field centre of the peak marked."""
from __future__ import annotations

from pathlib import Path

import torch


def render_peak_figure(path: Path, ds, top_index: torch.Tensor, top_values: torch.Tensor, peak_xy: torch.Tensor,
                       filters: list[dict], num_filters: int, num_images: int) -> None:
    """One row per filter (the first `num_filters` filters that fire): its top images with the receptive-field
    centre of the peak marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = [f for f in range(top_index.shape[0]) if bool(top_values[f, 0] > 0)][:num_filters]
    cols = min(num_images, top_index.shape[1])
    if not live or cols == 0:
        return
    fig, axes = plt.subplots(len(live), cols, figsize=(1.6 * cols, 1.7 * len(live)), squeeze=False)
    for r, f in enumerate(live):
        for c in range(cols):
            ax, i = axes[r][c], int(top_index[f, c])
            ax.imshow(ds[i]["raw"].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray")
            if bool(top_values[f, c] > 0):
                x, y = peak_xy[i, f].tolist()
                ax.scatter([x], [y], s=60, marker="+", c="red", linewidths=2)
            ax.set_xticks([])
            ax.set_yticks([])
        info = filters[f]
        axes[r][0].set_ylabel(f"f{f} {info['best_part']}\n{info['part_interpretability']:.2f}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
