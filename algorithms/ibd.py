"""Interpretable Basis Decomposition (Zhou et al., ECCV 2018): a class weight vector w_k in feature space as a
non-negative combination of concept vectors plus a residual, w_k = sum_i s_i q_ci + r (s_i >= 0, greedy).

Concept vectors come from network dissection's per-location statistics (DissectionResult.concept_vectors): for each
concept the mean feature vector at the locations it covers minus the mean over all locations, normalised - the
direction a class-mean (nearest-centroid) linear classifier of "concept vs rest" uses. The paper trains a logistic
classifier per concept; the mean direction needs no training, is exact under DDP (it is a ratio of sums) and is
cheap enough for every epoch.

Greedy selection: each step adds the concept whose vector is most aligned with the current residual (the largest
positive q_c . r, which is the largest single-step reduction of ||r||), then refits all selected coefficients by
non-negative least squares. At an NNLS optimum with positive coefficients r is orthogonal to every selected q, so
    ||w||^2 = sum_i s_i (q_i . w) + ||r||^2,
i.e. the concept shares s_i (q_i . w) / ||w||^2 and the residual energy ||r||^2 / ||w||^2 sum to one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls


@dataclass
class Decomposition:
    concepts: list[int]        # selected concept ids, in order of selection
    coefficients: list[float]  # s_i >= 0
    shares: list[float]        # s_i (q_i . w) / ||w||^2
    residual: float            # ||r|| / ||w||
    residual_energy: float     # ||r||^2 / ||w||^2

    def statement(self, concept_names, class_name: str) -> str:
        terms = " + ".join(f"{concept_names[c]} {100 * s:.0f}%" for c, s in zip(self.concepts, self.shares))
        return f"{class_name} = {terms or '(none)'} + residual {100 * self.residual_energy:.0f}%"


def decompose(w: torch.Tensor, concept_vectors: torch.Tensor, max_terms: int = 5, min_gain: float = 0.01,
              candidates: list[int] | None = None) -> Decomposition:
    """Greedy non-negative decomposition of w [D] over the rows of concept_vectors [C+1, D] (unit norm; zero rows,
    e.g. row 0 = unlabelled, are never chosen). Stops after max_terms concepts or when a step lowers the residual
    energy by less than min_gain (a share of ||w||^2)."""
    w64 = w.detach().double().cpu().numpy()
    q = concept_vectors.detach().double().cpu().numpy()
    norm2 = float(w64 @ w64)
    if norm2 == 0:
        return Decomposition([], [], [], 0.0, 0.0)
    usable = np.linalg.norm(q, axis=1) > 0
    if candidates is not None:
        keep = np.zeros_like(usable)
        keep[list(candidates)] = True
        usable &= keep
    selected: list[int] = []
    coef = np.zeros(0)
    residual = w64.copy()
    energy = 1.0
    for _ in range(max_terms):
        scores = q @ residual
        scores[~usable] = -np.inf
        scores[selected] = -np.inf
        best = int(np.argmax(scores))
        if not np.isfinite(scores[best]) or scores[best] <= 0:
            break
        trial = selected + [best]
        trial_coef, _ = nnls(q[trial].T, w64)
        trial_res = w64 - q[trial].T @ trial_coef
        trial_energy = float(trial_res @ trial_res) / norm2
        if energy - trial_energy < min_gain:
            break
        selected, coef, residual, energy = trial, trial_coef, trial_res, trial_energy
    keep = [i for i, s in enumerate(coef) if s > 0]
    selected, coef = [selected[i] for i in keep], coef[keep]
    shares = [float(s * (q[c] @ w64) / norm2) for c, s in zip(selected, coef)]
    return Decomposition(selected, [float(s) for s in coef], shares, float(np.sqrt(energy)), float(energy))
