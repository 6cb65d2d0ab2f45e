"""The model-randomisation sanity check (Adebayo et al. 2018): a map that explains the model must change when the
model's top layers are re-initialised; measured as the Spearman rank correlation of the maps before and after."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from core.probe import probe_layers


def average_ranks(v: Tensor) -> Tensor:
    """Ranks (0-based) of each row of [B, N], ties getting their average rank — as Spearman's rho needs; the many
    zeros of a ReLU'd Grad-CAM would otherwise be ranked by position."""
    s = v.sort(1).values.contiguous()
    lo = torch.searchsorted(s, v.contiguous(), right=False)
    hi = torch.searchsorted(s, v.contiguous(), right=True)
    return (lo + hi - 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps [B, ...] -> [B]; 0 where a map is constant (no ranking)."""
    ra, rb = average_ranks(a.flatten(1).double()), average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model that shares (does not copy) its Trainer/Fabric references."""
    memo = {id(v): v for k, v in vars(model).items() if k in ("_trainer", "_fabric") and v is not None}
    return copy.deepcopy(model, memo)


def randomize_top_layers(model: nn.Module, num_layers: int = 1, seed: int = 0) -> nn.Module:
    """Cascading model-parameter randomisation (Adebayo et al. 2018) on a deep copy: every parameter above the
    bottom `len(probe_layers) - num_layers` probe layers (the head, and the top `num_layers` probe layers) is
    re-initialised with its module's own initialiser, BatchNorm statistics reset. The live model is untouched; the
    same seed gives the same copy on every rank (the global RNG is forked, so training randomness is unaffected)."""
    layers = list(probe_layers(model).items())
    if num_layers < 1 or num_layers > len(layers):
        raise ValueError(f"sanity_layers={num_layers}: must be 1..{len(layers)} (probe layers: "
                         f"{', '.join(n for n, _ in layers) or 'none'})")
    rand = detached_copy(model)
    rand_layers = list(probe_layers(rand).values())
    kept = {id(p) for m in rand_layers[:len(rand_layers) - num_layers] for p in m.parameters()}
    kept_modules = {id(m) for layer in rand_layers[:len(rand_layers) - num_layers] for m in layer.modules()}
    devices = sorted({p.device.index or 0 for p in rand.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        reset = set()
        for m in rand.modules():
            if id(m) in kept_modules:
                continue
            own = list(m.parameters(recurse=False))
            if hasattr(m, "reset_parameters") and own:
                m.reset_parameters()
                reset.update(id(p) for p in own)
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        with torch.no_grad():
            for p in rand.parameters():
                if id(p) not in kept and id(p) not in reset:  # bare nn.Parameters (prototypes, capsule weights)
                    p.normal_(0.0, float(p.detach().float().std()) if p.numel() > 1 else 1.0)
    return rand.eval()
