"""Figures of a dissection result (rank 0, after the reduction): interpretable units per category with the histogram
of best IoUs, and a gallery of the best units on their maximally activating probe images. matplotlib is imported
inside the functions (import time)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from algorithms.dissection import unit_maps
from algorithms.dissection_result import DissectionResult
from core.probe import model_device


def render_summary(result: DissectionResult, path: Path, title: str = "") -> Path:
    """Bar chart of interpretable units per category and a histogram of the best IoUs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result.summary()
    cats = [c for c in result.category_names]
    counts = [s.get(f"category/{c}", 0) for c in cats]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(cats, counts, color="tab:blue")
    axes[0].set_ylabel("interpretable units")
    axes[0].set_title(f"{int(s['interpretable_units'])}/{result.num_units} units, {int(s['unique_concepts'])} concepts")
    axes[0].tick_params(axis="x", rotation=30)
    _, score = result.best
    axes[1].hist(score.numpy(), bins=30, color="tab:gray")
    axes[1].axvline(result.iou_threshold, color="tab:red", ls="--", label=f"IoU {result.iou_threshold}")
    axes[1].set_xlabel("best IoU per unit")
    axes[1].legend()
    fig.suptitle(title or result.layer)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_gallery(model: nn.Module, result: DissectionResult, probe: Dataset, path: Path, units: int = 8,
                   images_per_unit: int = 5, device=None) -> Path:
    """The best `units` units (by IoU), each with its maximally activating probe images; outside the unit's
    thresholded region (upsampled map > T_u) the image is dimmed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    concept, score = result.best
    order = score.argsort(descending=True)[:units].tolist()
    n_img = min(images_per_unit, result.top_images.shape[1])
    device = device or model_device(model)
    fig, axes = plt.subplots(max(1, len(order)), max(1, n_img), figsize=(1.6 * max(1, n_img), 1.7 * max(1, len(order))),
                             squeeze=False)
    for row, u in enumerate(order):
        idx = [i for i in result.top_images[u, :n_img].tolist() if i >= 0]
        items = [probe[i] for i in idx]
        if not items:
            continue
        images = torch.stack([it["image"] for it in items]).to(device)
        raw = torch.stack([it["raw"] if "raw" in it else it["image"] for it in items]).float()
        maps = unit_maps(model, result.layer, images)[:, u:u + 1].float().cpu()
        up = F.interpolate(maps, size=raw.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        region = (up > result.thresholds[u]).float()[:, None]
        shown = (raw * (0.3 + 0.7 * region)).clamp(0, 1)
        for col in range(n_img):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(items):
                img = shown[col].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
                ax.contour(region[col, 0].numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        label = result.concept_names[int(concept[u])] if int(concept[u]) else "-"
        axes[row, 0].set_title(f"unit {u + 1}: {label} ({float(score[u]):.3f})", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
