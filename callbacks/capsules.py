"""What the class capsules of a CapsNet encode (Sabour et al. 2017, Sec. 5.1 / Fig. 4) and where routing sends
the primary capsules.

- `perturb_capsule_dimensions`: each of the 16 dimensions of the winning class capsule is moved over
  [-0.25, 0.25] in steps of 0.05 and the masked capsule decoded; each row of the grid shows what one dimension
  encodes (scale and thickness, localised part, stroke thickness, skew, width and translation on MNIST).
- `coupling_to_prediction`: the final coupling coefficients c_ij of every primary capsule i to the predicted class j,
  arranged on the primary-capsule grid [types, h, w].
The callback below renders both for a few fixed test images into <run>/interp/capsules/epoch_NNN/ and W&B.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning import LightningModule, Trainer

from callbacks.base import InterpretationCallback, write_json

#: the paper's perturbation range: [-0.25, 0.25] in steps of 0.05 (11 values)
PERTURBATIONS = tuple(round(-0.25 + 0.05 * i, 2) for i in range(11))


@torch.no_grad()
def perturb_capsule_dimensions(model, images: torch.Tensor, deltas=PERTURBATIONS
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions [N, dims, len(deltas), C, H, W] of `images` with dimension d of the winning capsule shifted by
    each delta (all N * dims * steps poses decoded in one batch), and the predicted classes [N]."""
    out = model.capsules(images, reconstruct=False)
    pred = out.lengths.argmax(1)
    N, K, dims = out.poses.shape
    delta = torch.as_tensor(deltas, dtype=out.poses.dtype, device=images.device)
    winner = out.poses[torch.arange(N, device=images.device), pred]                       # [N, dims]
    shift = torch.eye(dims, dtype=winner.dtype, device=images.device)[:, None, :] * delta[None, :, None]
    poses = winner[:, None, None, :] + shift[None]                                        # [N, dims, S, dims]
    S = delta.numel()
    full = poses.new_zeros(N, dims, S, K, dims)
    full[torch.arange(N, device=images.device), :, :, pred] = poses
    recon = model.decode(full.view(-1, K, dims), pred.repeat_interleave(dims * S))
    return recon.view(N, dims, S, *recon.shape[1:]), pred


@torch.no_grad()
def coupling_to_prediction(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coupling coefficients c_ij of every primary capsule to the predicted class, [N, types, grid, grid], and the
    predicted classes [N]."""
    out = model.capsules(images, reconstruct=False)
    pred = out.lengths.argmax(1)
    N = images.shape[0]
    c = out.couplings[torch.arange(N, device=images.device), :, pred]                      # [N, I]
    return c.view(N, model.primary_types, model.grid_size, model.grid_size), pred


def _tile(recon: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """[rows, cols, C, H, W] -> one image [(H+pad)*rows, (W+pad)*cols, C] with white separators."""
    rows, cols, C, H, W = recon.shape
    canvas = torch.ones(rows, cols, C, H + pad, W + pad)
    canvas[..., :H, :W] = recon
    return canvas.permute(0, 3, 1, 4, 2).reshape(rows * (H + pad), cols * (W + pad), C)


class CapsulesCallback(InterpretationCallback):
    """Capsule dimension perturbations and coupling heat maps for `num_images` fixed test images (CapsNet only)."""

    name = "capsules"

    def __init__(self, num_images: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_images = int(num_images)

    def applies_to(self, module: LightningModule) -> bool:
        from models.capsnet import CapsNet
        return isinstance(module, CapsNet)

    def images(self, trainer: Trainer, module) -> tuple[torch.Tensor, torch.Tensor]:
        dm = self.datamodule(trainer)
        try:
            ds = dm.vis_dataset("test")
        except Exception:  # test split not prepared during fit on some datamodules
            ds = dm.vis_dataset("val")
        items = [ds[i] for i in range(min(self.num_images, len(ds)))]
        raw = torch.stack([torch.as_tensor(it[0]) for it in items])
        labels = torch.as_tensor([int(it[1]) for it in items])
        return dm.normalize(raw).to(module.device), labels

    def run(self, trainer: Trainer, module, epoch: int) -> dict[str, float]:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, labels = self.images(trainer, module)
        recon, pred = perturb_capsule_dimensions(module, x)
        coupling, _ = coupling_to_prediction(module, x)
        with torch.no_grad():
            full = module.capsules(x, reconstruct=True)
        sse = (full.reconstruction - full.target).pow(2).flatten(1).sum(1)
        # how much the decoded image changes across the sweep, per dimension: dimensions that encode something move
        sweep_change = (recon[:, :, -1] - recon[:, :, 0]).abs().flatten(2).mean(2)          # [N, dims]
        grid_map = coupling.mean(1)                                                          # [N, g, g]
        metrics = {"reconstruction_sse": float(sse.mean()),
                   "coupling_to_prediction_mean": float(coupling.mean()),
                   "coupling_to_prediction_max": float(coupling.amax(dim=(1, 2, 3)).mean()),
                   "perturbation_change_mean": float(sweep_change.mean())}
        if not self.is_rank_zero:
            return metrics

        out_dir = self.epoch_dir(trainer, epoch)
        names = getattr(self.datamodule(trainer), "class_names", None)
        name = (lambda c: names[c] if names and c < len(names) else str(c))
        paths, captions = [], []
        for n in range(x.shape[0]):
            path = out_dir / f"perturbation_{n:02d}.png"
            tile = _tile(recon[n].cpu()).clamp(0, 1).numpy()
            fig, ax = plt.subplots(figsize=(6, 8.5))
            ax.imshow(tile.squeeze(-1) if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([(i + 0.5) * (tile.shape[1] / len(PERTURBATIONS)) for i in range(len(PERTURBATIONS))])
            ax.set_xticklabels([f"{d:+.2f}" for d in PERTURBATIONS], fontsize=6)
            ax.set_yticks([(i + 0.5) * (tile.shape[0] / recon.shape[1]) for i in range(recon.shape[1])])
            ax.set_yticklabels([f"dim {i}" for i in range(recon.shape[1])], fontsize=6)
            ax.set_title(f"image {n}: label {name(int(labels[n]))}, predicted {name(int(pred[n]))}", fontsize=8)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
            captions.append(f"image {n} pred {name(int(pred[n]))}")

        heat = out_dir / "coupling_heatmap.png"
        raw = module.to_unit_range(x).cpu()
        fig, axes = plt.subplots(2, x.shape[0], figsize=(2.2 * x.shape[0], 4.4), squeeze=False)
        for n in range(x.shape[0]):
            img = raw[n].permute(1, 2, 0).numpy()
            axes[0, n].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[0, n].set_title(f"label {name(int(labels[n]))}, pred {name(int(pred[n]))}", fontsize=8)
            im = axes[1, n].imshow(grid_map[n].cpu().numpy(), cmap="viridis")
            axes[1, n].set_title("mean c_i,pred over types", fontsize=7)
            fig.colorbar(im, ax=axes[1, n], fraction=0.046)
            for ax in axes[:, n]:
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(heat, dpi=110)
        plt.close(fig)

        write_json(out_dir / "capsules.json", {
            "epoch": epoch, "perturbations": list(PERTURBATIONS),
            "images": [{"index": n, "label": int(labels[n]), "predicted": int(pred[n]),
                        "lengths": full.lengths[n].tolist(), "reconstruction_sse": float(sse[n]),
                        "perturbation_change_per_dim": sweep_change[n].tolist(),
                        "coupling_to_prediction_grid": grid_map[n].tolist()} for n in range(x.shape[0])],
            "metrics": metrics})
        self.log_images(trainer, "perturbation", paths, captions)
        self.log_images(trainer, "coupling_heatmap", [heat])
        return metrics
