"""Latent directions and traversals. SeFa (Shen & Zhou, CVPR 2021, Eq. 4-5): the first step of the generator is
affine, y = A z + b, so moving z by alpha n moves y by alpha A n; the unit directions that move y most maximise
||A n||^2, i.e. are the eigenvectors of A^T A with the largest eigenvalues (closed form, no sampling). Baselines:
random unit directions and (for a generator trained with the Hessian penalty) the coordinate axes of z.
A traversal z + alpha n is measured by the segmenter's concept shares and its class probabilities."""
from __future__ import annotations

from typing import Sequence

import torch

from algorithms.gan.result import LatentDirectionsResult
from algorithms.gan.sampling import (check_generator, concept_shares, on_every_rank, rank_sum, segmenter_of,
                                     shard_latents)
from core.errors import ConfigError
from core.probe import interpretation_mode, model_device

FAMILIES = ("sefa", "random", "axes")


def sefa(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions [k, latent_dim] (unit norm, orthogonal), eigenvalues [k] descending) of A^T A for the affine
    map's weight A [D, latent_dim]."""
    a = weight.detach().double()
    values, vectors = torch.linalg.eigh(a.T @ a)          # ascending
    order = values.argsort(descending=True)[:k]
    return vectors[:, order].T.float(), values[order].float()


def random_directions(latent_dim: int, k: int, seed: int = 0) -> torch.Tensor:
    d = torch.randn(k, latent_dim, generator=torch.Generator().manual_seed(int(seed)))
    return d / d.norm(dim=1, keepdim=True)


def coordinate_axes(latent_dim: int, k: int) -> torch.Tensor:
    return torch.eye(latent_dim)[:k]


def directions_of(model, families: Sequence[str], k: int, seed: int = 0):
    """{family: [k, latent_dim]} and SeFa's eigenvalues."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ConfigError(f"families={list(families)}: unknown {bad}; use any of {', '.join(FAMILIES)}")
    out, eig = {}, None
    dim = int(model.latent_dim)
    k = min(int(k), dim)
    for fam in families:
        if fam == "sefa":
            out[fam], eig = sefa(model.latent_affine()[0], k)
        elif fam == "random":
            out[fam] = random_directions(dim, k, seed)
        else:
            out[fam] = coordinate_axes(dim, k)
    return out, eig


def traverse(model, directions: dict[str, torch.Tensor], alphas: Sequence[float] = (-3.0, -1.5, 0.0, 1.5, 3.0),
             num_samples: int = 32, seed: int = 2, batch_size: int = 64, change_threshold: float = 0.01,
             eigenvalues: torch.Tensor | None = None) -> LatentDirectionsResult:
    """Concept shares and class probabilities of G(z + alpha n), averaged over `num_samples` latents, for every
    direction n of every family. `change_threshold`: a concept whose share moves by more counts as changed. Under DDP
    each rank traverses from its share of the latents and the sums that make the means are all-reduced (the same
    result on every rank; call it on every rank)."""
    check_generator(model)
    segmenter = segmenter_of(model)
    alphas = [float(a) for a in alphas]
    device = model_device(model)
    shares, classes = {}, {}
    with interpretation_mode(model, grad=False):
        z, _ = shard_latents(model, num_samples, seed)
        for fam, dirs in directions.items():
            s_sum, p_sum = on_every_rank(device, _traversal_sums, model, segmenter, z, dirs, alphas, batch_size)
            shares[fam] = (rank_sum(s_sum, 3, device) / num_samples).float().cpu()
            classes[fam] = (rank_sum(p_sum, 3, device) / num_samples).float().cpu()
    return LatentDirectionsResult(alphas=alphas, concept_names=list(segmenter.concept_names),
                                  num_samples=int(num_samples), seed=int(seed),
                                  change_threshold=float(change_threshold),
                                  directions={k: v.cpu() for k, v in directions.items()}, shares=shares,
                                  classes=classes, eigenvalues=eigenvalues)


def _traversal_sums(model, segmenter, z, dirs, alphas, batch_size):
    """Sums over this rank's latents of the concept shares [D, A, C+1] and class probabilities [D, A, K] of
    G(z + alpha n) (None, None without latents)."""
    if not len(z):
        return None, None
    # every (direction, alpha, z) as one batch axis: [D, A, N, latent]
    zz = z[None, None] + torch.tensor(alphas, device=z.device).view(1, -1, 1, 1) * dirs.to(z)[:, None, None]
    flat = zz.reshape(-1, z.shape[1])
    s, p = [], []
    for i in range(0, len(flat), batch_size):
        images = model.generate(flat[i:i + batch_size])
        s.append(concept_shares(segmenter, images).double())
        p.append(segmenter.class_scores(images).softmax(-1).double())
    return (torch.cat(s).view(len(dirs), len(alphas), len(z), -1).sum(2),
            torch.cat(p).view(len(dirs), len(alphas), len(z), -1).sum(2))
