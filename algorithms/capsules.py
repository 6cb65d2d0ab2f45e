"""What the class capsules of a CapsNet encode (Sabour et al. 2017, Sec. 5.1 / Fig. 4) and where routing sends the
primary capsules. Works on any model that offers `CapsuleModel` (core/protocol.py); figures in
algorithms/capsules_render.py.

- `perturb_capsule_dimensions`: each dimension of the winning class capsule is moved over [-0.25, 0.25] in steps of
  0.05 and the masked capsule decoded; each row of the grid shows what one dimension encodes (scale and thickness,
  localised part, stroke thickness, skew, width and translation on MNIST).
- `coupling_to_prediction`: the final coupling coefficients c_ij of every primary capsule i to the predicted class
  j, arranged on the primary-capsule grid [types, h, w].
- `analyse_capsules`: both (and the reconstruction error) from one forward pass, for a few images; `.result(...)`
  is the typed `CapsulesResult` (capsules.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from core.results import Result

#: the paper's perturbation range: [-0.25, 0.25] in steps of 0.05 (11 values)
PERTURBATIONS = tuple(round(-0.25 + 0.05 * i, 2) for i in range(11))


def _perturb(model, poses: torch.Tensor, pred: torch.Tensor, deltas) -> torch.Tensor:
    """Decoded [N, dims, len(deltas), C, H, W]: dimension d of the winning capsule shifted by each delta (all
    N * dims * steps poses decoded in one batch)."""
    N, K, dims = poses.shape
    delta = torch.as_tensor(deltas, dtype=poses.dtype, device=poses.device)
    winner = poses[torch.arange(N, device=poses.device), pred]                            # [N, dims]
    shift = torch.eye(dims, dtype=winner.dtype, device=poses.device)[:, None, :] * delta[None, :, None]
    moved = winner[:, None, None, :] + shift[None]                                        # [N, dims, S, dims]
    S = delta.numel()
    full = moved.new_zeros(N, dims, S, K, dims)
    full[torch.arange(N, device=poses.device), :, :, pred] = moved
    recon = model.decode(full.view(-1, K, dims), pred.repeat_interleave(dims * S))
    return recon.view(N, dims, S, *recon.shape[1:])


def _coupling_grid(model, couplings: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    N = couplings.shape[0]
    c = couplings[torch.arange(N, device=couplings.device), :, pred]                        # [N, I]
    return c.view(N, model.primary_types, model.grid_size, model.grid_size)


@torch.no_grad()
def perturb_capsule_dimensions(model, images: torch.Tensor, deltas=PERTURBATIONS
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions [N, dims, len(deltas), C, H, W] of `images` with dimension d of the winning capsule shifted by
    each delta, and the predicted classes [N]."""
    out = model.capsules(images, reconstruct=False)
    pred = out.lengths.argmax(1)
    return _perturb(model, out.poses, pred, deltas), pred


@torch.no_grad()
def coupling_to_prediction(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coupling coefficients c_ij of every primary capsule to the predicted class, [N, types, grid, grid], and the
    predicted classes [N]."""
    out = model.capsules(images, reconstruct=False)
    pred = out.lengths.argmax(1)
    return _coupling_grid(model, out.couplings, pred), pred


@dataclass
class CapsuleAnalysis:
    """Tensors of `analyse_capsules` (on the images' device)."""
    images01: torch.Tensor        # [N, C, H, W] the inputs in [0, 1]
    lengths: torch.Tensor         # [N, K]
    pred: torch.Tensor            # [N]
    recon: torch.Tensor           # [N, dims, steps, C, H, W] decoded perturbations
    coupling: torch.Tensor        # [N, types, grid, grid] couplings to the predicted class
    sse: torch.Tensor             # [N] reconstruction error (sum of squares per image)
    sweep_change: torch.Tensor    # [N, dims] mean |decoded(+0.25) - decoded(-0.25)| per dimension
    deltas: tuple

    def metrics(self) -> dict[str, float]:
        return {"reconstruction_sse": float(self.sse.mean()),
                "coupling_to_prediction_mean": float(self.coupling.mean()),
                "coupling_to_prediction_max": float(self.coupling.amax(dim=(1, 2, 3)).mean()),
                "perturbation_change_mean": float(self.sweep_change.mean())}

    def result(self, labels: Sequence[int], epoch: int = -1) -> "CapsulesResult":
        grid_map = self.coupling.mean(1)                                                   # [N, g, g]
        images = [{"index": n, "label": int(labels[n]), "predicted": int(self.pred[n]),
                   "lengths": self.lengths[n].tolist(), "reconstruction_sse": float(self.sse[n]),
                   "perturbation_change_per_dim": self.sweep_change[n].tolist(),
                   "coupling_to_prediction_grid": grid_map[n].tolist()} for n in range(len(self.pred))]
        return CapsulesResult(epoch=int(epoch), perturbations=[float(d) for d in self.deltas], images=images,
                              metrics=self.metrics())


@torch.no_grad()
def analyse_capsules(model, images: torch.Tensor, deltas=PERTURBATIONS) -> CapsuleAnalysis:
    """Perturbations of the winning capsule, couplings to the prediction and the reconstruction error of `images`
    (normalised), from one forward pass with reconstruction."""
    out = model.capsules(images, reconstruct=True)
    pred = out.lengths.argmax(1)
    recon = _perturb(model, out.poses, pred, deltas)
    sse = (out.reconstruction - out.target).pow(2).flatten(1).sum(1)
    # how much the decoded image changes across the sweep, per dimension: dimensions that encode something move
    sweep_change = (recon[:, :, -1] - recon[:, :, 0]).abs().flatten(2).mean(2)
    return CapsuleAnalysis(images01=out.target, lengths=out.lengths, pred=pred, recon=recon,
                           coupling=_coupling_grid(model, out.couplings, pred), sse=sse, sweep_change=sweep_change,
                           deltas=tuple(deltas))


@dataclass
class CapsulesResult(Result):
    """capsules.json: the perturbation steps, per image its label, prediction, capsule lengths, reconstruction
    error, decoded change per capsule dimension and the coupling-to-prediction grid (mean over capsule types), and
    the scalars logged as interp/capsules/<name>."""

    schema = "capsules"
    schema_version = 1

    epoch: int
    perturbations: list[float]
    images: list[dict[str, Any]]
    metrics: dict[str, float]

    def payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "perturbations": list(self.perturbations), "images": self.images,
                "metrics": dict(self.metrics)}

    @classmethod
    def from_payload(cls, data: dict[str, Any], version: int) -> "CapsulesResult":
        return cls(epoch=int(data["epoch"]), perturbations=[float(d) for d in data["perturbations"]],
                   images=list(data["images"]), metrics=dict(data["metrics"]))
