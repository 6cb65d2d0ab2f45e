"""Figures of algorithms/capsules.py (plain code; matplotlib is imported when a figure is drawn): one perturbation
grid per image (the paper's Fig. 4: rows = capsule dimensions, columns = perturbations) and the coupling heat maps
of the primary-capsule grid."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from algorithms.capsules import CapsuleAnalysis


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def tile(recon: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """[rows, cols, C, H, W] -> one image [(H+pad)*rows, (W+pad)*cols, C] with white separators."""
    rows, cols, C, H, W = recon.shape
    canvas = torch.ones(rows, cols, C, H + pad, W + pad)
    canvas[..., :H, :W] = recon
    return canvas.permute(0, 3, 1, 4, 2).reshape(rows * (H + pad), cols * (W + pad), C)


def render_perturbations(analysis: CapsuleAnalysis, labels: Sequence[int], out_dir: Path,
                         name: Callable[[int], str] = str) -> tuple[list[Path], list[str]]:
    """perturbation_NN.png per image; returns the paths and W&B captions."""
    plt = _pyplot()
    recon, pred, deltas = analysis.recon, analysis.pred, analysis.deltas
    paths, captions = [], []
    for n in range(recon.shape[0]):
        path = out_dir / f"perturbation_{n:02d}.png"
        image = tile(recon[n].cpu()).clamp(0, 1).numpy()
        fig, ax = plt.subplots(figsize=(6, 8.5))
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([(i + 0.5) * (image.shape[1] / len(deltas)) for i in range(len(deltas))])
        ax.set_xticklabels([f"{d:+.2f}" for d in deltas], fontsize=6)
        ax.set_yticks([(i + 0.5) * (image.shape[0] / recon.shape[1]) for i in range(recon.shape[1])])
        ax.set_yticklabels([f"dim {i}" for i in range(recon.shape[1])], fontsize=6)
        ax.set_title(f"image {n}: label {name(int(labels[n]))}, predicted {name(int(pred[n]))}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        captions.append(f"image {n} pred {name(int(pred[n]))}")
    return paths, captions


def render_coupling_heatmap(analysis: CapsuleAnalysis, labels: Sequence[int], path: Path,
                            name: Callable[[int], str] = str) -> Path:
    """Each image above the mean (over capsule types) of its primary capsules' couplings to the predicted class."""
    plt = _pyplot()
    raw = analysis.images01.cpu()
    grid_map = analysis.coupling.mean(1).cpu()
    pred, n_images = analysis.pred, raw.shape[0]
    fig, axes = plt.subplots(2, n_images, figsize=(2.2 * n_images, 4.4), squeeze=False)
    for n in range(n_images):
        img = raw[n].permute(1, 2, 0).numpy()
        axes[0, n].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        axes[0, n].set_title(f"label {name(int(labels[n]))}, pred {name(int(pred[n]))}", fontsize=8)
        im = axes[1, n].imshow(grid_map[n].numpy(), cmap="viridis")
        axes[1, n].set_title("mean c_i,pred over types", fontsize=7)
        fig.colorbar(im, ax=axes[1, n], fraction=0.046)
        for ax in axes[:, n]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
