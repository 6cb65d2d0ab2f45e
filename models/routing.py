"""Routing by agreement (Sabour, Frosst & Hinton 2017, Procedure 1) and the squash non-linearity (Eq. 1).

Layout: votes are [B, J, I, D] (batch, parent/output capsule, child/input capsule, pose dim) so that both inner
products of one routing iteration are single batched matmuls over (batch, parent):
  s_j = sum_i c_ij u_hat_{j|i}   ->  [B, J, 1, I] @ [B, J, I, D]
  a_ij = u_hat_{j|i} . v_j       ->  [B, J, I, D] @ [B, J, D, 1]
The only Python loop is over the r routing iterations.
"""
from __future__ import annotations

import torch

#: keeps squash finite and differentiable at s = 0 (|s| appears in a denominator)
SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|. The length of v lies in [0, 1): short vectors shrink to ~0, long
    ones approach (never reach) 1. `eps` inside the square root avoids the 0/0 (and the NaN gradient) at s = 0."""
    sq_norm = (s * s).sum(dim=dim, keepdim=True)
    return s * (sq_norm / ((1.0 + sq_norm) * torch.sqrt(sq_norm + eps)))


def dynamic_routing(votes: torch.Tensor, iterations: int = 3, detach_votes: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1 of the paper on votes u_hat [B, J, I, D]; returns (parent poses v [B, J, D], couplings c [B, I, J]).

    The coupling coefficients c_i = softmax_j(b_i) are normalised over the PARENTS j (each child distributes its
    output among the parents) -- the softmax over the children i found in some ports is a bug.
    With `detach_votes` the non-final iterations see the votes without gradient (a common stabiliser): the
    couplings then act as constants in the backward pass and the r - 1 agreement steps store nothing for autograd.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least one iteration, got {iterations}")
    B, J, I, _ = votes.shape
    logits = votes.new_zeros(B, J, I)  # b_ij, kept as [B, J, I] to match the votes' layout
    votes_nograd = votes.detach() if detach_votes else votes
    for r in range(iterations):
        last = r == iterations - 1
        u = votes if last else votes_nograd
        c = torch.softmax(logits, dim=1)                       # over parents j
        s = torch.matmul(c.unsqueeze(2), u).squeeze(2)          # [B, J, D]
        v = squash(s)
        if not last:
            logits = logits + torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)   # agreement u_hat . v
    return v, c.transpose(1, 2)
