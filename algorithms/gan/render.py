"""Figures of the GAN methods (rank 0): the top units of a dissection on their strongest samples with the unit's
thresholded mask outlined, the same z before / after ablation and insertion of a concept's units, and latent
traversals labelled with the concept that changes most. matplotlib is imported inside the functions."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from algorithms.dissection_result import DissectionResult
from algorithms.gan.dissection import units_for
from algorithms.gan.interventions import region_mask, unit_edit
from algorithms.gan.result import InterventionResult, LatentDirectionsResult
from algorithms.gan.sampling import generate_with, latents
from core.probe import interpretation_mode


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _img(t: torch.Tensor):
    return t.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def render_top_units(model, result: DissectionResult, path: Path, num_units: int = 6, per_unit: int = 4) -> Path:
    """One row per unit (the interpretable ones with the highest IoU): its strongest samples, the thresholded
    upsampled unit map outlined in white; titled unit, concept, IoU."""
    plt = _plt()
    concept, score = result.best
    order = [u for u in score.argsort(descending=True).tolist() if concept[u] > 0][:num_units]
    if not order:
        order = score.argsort(descending=True).tolist()[:num_units]
    z_all = latents(model, result.extra.get("num_samples", result.num_images), result.extra.get("seed", 0))
    fig, axes = plt.subplots(len(order), per_unit, figsize=(1.6 * per_unit, 1.7 * len(order)), squeeze=False)
    with interpretation_mode(model, grad=False):
        for row, u in enumerate(order):
            idx = result.top_images[u, :per_unit].to(z_all.device)
            images, r = generate_with(model, result.layer, z_all[idx])
            up = F.interpolate(r[:, u:u + 1], size=images.shape[-2:], mode="bilinear", align_corners=False)
            mask = (up[:, 0] > result.thresholds[u].to(up.device)).float().cpu().numpy()
            for k in range(per_unit):
                ax = axes[row, k]
                ax.axis("off")
                if k >= len(images):
                    continue
                ax.imshow(_img(images[k]))
                ax.contour(mask[k], levels=[0.5], colors="white", linewidths=1.0)
            axes[row, 0].set_title(f"unit {u}: {result.concept_names[int(concept[u])]} IoU {float(score[u]):.3f}",
                                   fontsize=7, loc="left")
    fig.suptitle(f"GAN dissection of {result.layer}", fontsize=9)
    return _save(fig, path)


def render_intervention(model, dissection: DissectionResult, result: InterventionResult, path: Path,
                        num_images: int = 4) -> Path:
    """Per concept three rows on the same z: generated, its top units ablated, inserted; titled with the shares."""
    plt = _plt()
    rows = result.concepts
    z = latents(model, num_images, result.seed)
    area = region_mask(dissection.map_size, result.region)
    fig, axes = plt.subplots(3 * len(rows), num_images, figsize=(1.7 * num_images, 1.25 * 3 * len(rows)),
                             squeeze=False)
    with interpretation_mode(model, grad=False):
        for i, row in enumerate(rows):
            units = torch.tensor(row.units)
            k = dissection.thresholds[units] * result.insert_scale
            variants = [("generated", None), ("ablated", unit_edit(units, 0.0, area)),
                        ("inserted", unit_edit(units, k, area))]
            for j, (label, edit) in enumerate(variants):
                images, _ = generate_with(model, dissection.layer, z, edit)
                for n in range(num_images):
                    ax = axes[3 * i + j, n]
                    ax.imshow(_img(images[n]))
                    ax.axis("off")
                axes[3 * i + j, 0].set_title(f"{row.name}: {label}", fontsize=7, loc="left")
            axes[3 * i, 0].set_title(f"{row.name}: generated (share {row.base_share:.3f}); {len(row.units)} units ablated: "
                                     f"{-100 * row.ablation_drop:+.0f}% (random {-100 * row.random_ablation_drop:+.0f}%)"
                                     f", ACE {row.ace:+.3f}", fontsize=7,
                                     loc="left")
    fig.suptitle(f"interventions at {dissection.layer}", fontsize=9)
    return _save(fig, path)


def render_traversal(model, result: LatentDirectionsResult, family: str, path: Path) -> Path:
    """Rows = directions of one family, columns = alphas, one z; each row names the concept whose share changes
    most along it and by how much."""
    plt = _plt()
    dirs = result.directions[family]
    z = latents(model, 1, result.seed)
    alphas = torch.tensor(result.alphas, device=z.device)
    change = result.change(family)
    fig, axes = plt.subplots(len(dirs), len(alphas), figsize=(1.4 * len(alphas), 1.6 * len(dirs)), squeeze=False)
    with interpretation_mode(model, grad=False):
        for i, d in enumerate(dirs.to(z.device)):
            images = model.generate(z + alphas[:, None] * d[None])
            for j in range(len(alphas)):
                ax = axes[i, j]
                ax.imshow(_img(images[j]))
                ax.set_xticks([])
                ax.set_yticks([])
                if i == len(dirs) - 1:
                    ax.set_xlabel(f"alpha {result.alphas[j]:+.1f}", fontsize=7)
            c = int(change[i].argmax())
            axes[i, 0].set_title(f"{family} {i}: {result.concept_names[c]} share moves {float(change[i, c]):.3f}; "
                                 f"{int(result.concepts_changed(family)[i])} concepts change", fontsize=7, loc="left")
    fig.suptitle(f"latent traversals: {family}", fontsize=9)
    return _save(fig, path)
