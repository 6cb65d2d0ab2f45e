"""Overlays of attribution maps on their images (rank 0 draws them; matplotlib is imported only here, when drawing)."""
from __future__ import annotations

from torch import Tensor


def render_overlays(images01: Tensor, maps: dict[str, Tensor], path, titles: list[str] | None = None) -> None:
    """One row per image: the image, then each method's map over it (heat maps) or alone (gradient images)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, cols = images01.shape[0], 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    imgs = images01.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for r in range(n):
        img = imgs[r][..., 0] if imgs.shape[-1] == 1 else imgs[r]
        axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r, 0].set_title(titles[r] if titles else "", fontsize=6)
        for c, (name, m) in enumerate(maps.items(), 1):
            m = m[r].detach().float().cpu()
            if m.shape[0] > 1:  # gradient image: centred, scaled to [0, 1]
                g = m / (2 * m.abs().max().clamp_min(1e-12)) + 0.5
                axes[r, c].imshow(g.permute(1, 2, 0).numpy().clip(0, 1))
            else:
                h = m[0]
                h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)
                axes[r, c].imshow(img, cmap="gray" if img.ndim == 2 else None)
                axes[r, c].imshow(h.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
