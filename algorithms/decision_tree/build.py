"""The bottom-up decision tree over rationales (Zhang, Yang, Ma, Wu, CVPR 2019, Sec. 3-4), vectorised.

A node v holds a set of images Omega_v and one sparse, shared weight vector w_v (its decision mode). As in the
paper, a mode is fitted to its images by maximising the summed cosine between each image's rationale and the mode
under an L1 sparsity prior, with ||w|| = 1:

    F(v) = max_{||w||_2 <= 1}  sum_{I in Omega_v} <u_I, w>  -  lambda |Omega_v| ||w||_1,     u_I = rho_I / ||rho_I||

The paper solves this by alternating a lasso step and a normalisation; here it has a closed form. With
s_v = sum_I u_I, the objective is <s_v, w> - lambda n_v ||w||_1, maximised on the unit ball by the soft-thresholded
sum: w_v = S(s_v, lambda n_v) / ||S(s_v, lambda n_v)|| and F(v) = ||S(s_v, lambda n_v)||, S(s, t) = sign(s) max(|s| -
t, 0). lambda is per image, so a unit belongs to a mode when its mean normalised contribution over the mode's images
exceeds lambda, whatever the node's size (a per-node lambda would make large nodes dense).

F is a maximum of functions linear in (s, n), so it is subadditive: merging two nodes never increases the fit,
loss(v, v') = F(v) + F(v') - F(v u v') >= 0. Each step merges the pair with the smallest loss (the largest gain in
fit, i.e. in the log-likelihood of the paper's exp(cos) model), until one node per predicted class is left; the
merges form a binary tree whose leaves are the images. The paper stops merging when the gain no longer pays for
the prior on the number of nodes; equivalently we keep the full hierarchy and cut it at `mode_loss` (algorithms/
decision_tree/tree.py): the root's children are the largest nodes whose merge cost at most mode_loss per image.

Cost for n images of one class and D units: the pair-loss matrix is O(n^2 D) time (built in row blocks of bounded
memory) and O(n^2) memory; each of the n - 1 merges updates one row and column in O(n D) and re-scans only the rows
whose best partner was merged. Total O(n^2 D) time, quadratic in the images of a class (classes are independent:
sum_c n_c^2, not N^2, for N images over K classes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

#: elements of one [rows, n, D] block when the pair-loss matrix is built (bounds the memory to ~64 MB in float32)
BLOCK_ELEMENTS = 1 << 24


def soft_threshold(s: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return s.sign() * (s.abs() - t).clamp_min(0)


def mode_fit(s: torch.Tensor, n: torch.Tensor, sparsity: float) -> torch.Tensor:
    """F(s, n) = ||S(s, sparsity * n)||_2 over the last dimension (s [..., D], n [...])."""
    return soft_threshold(s, sparsity * n.unsqueeze(-1)).norm(dim=-1)


def mode_weights(s: torch.Tensor, n: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The mode w = S(s, sparsity n) / ||.|| (zero when every unit is thresholded away)."""
    w = soft_threshold(s, sparsity * n.unsqueeze(-1))
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def unit_rationales(rho: torch.Tensor) -> torch.Tensor:
    """u_I = rho_I / ||rho_I|| (a zero rationale stays zero)."""
    return rho / rho.norm(dim=-1, keepdim=True).clamp_min(1e-30)


@dataclass
class Merges:
    """The binary hierarchy of one class. Nodes 0..n-1 are the images (leaves, in input order); node n + t is made by
    merge t from left[t], right[t] (node ids). sums [2n-1, D] = s_v, counts [2n-1] = n_v, loss [n-1] = loss(v, v')
    of each merge (the fit lost by sharing one mode), extra [2n-1, E] = the sums of `extra` over each node's images
    (raw contributions and scores, for the node's mean)."""
    left: torch.Tensor
    right: torch.Tensor
    loss: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    extra: torch.Tensor

    @property
    def num_leaves(self) -> int:
        return int(self.left.numel()) + 1

    @property
    def root(self) -> int:
        return 2 * self.num_leaves - 2


def _pair_losses(s: torch.Tensor, n: torch.Tensor, f: torch.Tensor, sparsity: float) -> torch.Tensor:
    """loss[i, j] = F_i + F_j - F(s_i + s_j, n_i + n_j) for every pair, in row blocks of bounded memory."""
    m, d = s.shape
    out = torch.empty(m, m, dtype=s.dtype, device=s.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, m * d))
    for start in range(0, m, rows):
        blk = slice(start, start + rows)
        merged = mode_fit(s[blk, None, :] + s[None], n[blk, None] + n[None], sparsity)
        out[blk] = f[blk, None] + f[None] - merged
    return out


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """The merge loop is many tiny tensor operations: on a loaded CPU, intra-op threads cost more than they give
    (measured: 180 images, 12 units, load ~13 on 2 cores: 5.3 s with the default threads, 0.48 s with one)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def agglomerate(u: torch.Tensor, sparsity: float, extra: torch.Tensor | None = None) -> Merges:
    """Greedy bottom-up merging (see `_agglomerate`) with one intra-op thread on the CPU."""
    with one_cpu_thread(u.device):
        return _agglomerate(u, sparsity, extra)


def _agglomerate(u: torch.Tensor, sparsity: float, extra: torch.Tensor | None = None) -> Merges:
    """Greedy bottom-up merging of the images with unit rationales u [n, D] (one class) down to one node; `extra`
    [n, E] is summed along (Merges.extra).

    The loop runs once per merge (n - 1 times, inherently sequential: each merge changes the candidates of the
    next); every step is a fixed number of tensor operations over the n current nodes."""
    n_img, d = u.shape
    dev, dtype = u.device, u.dtype
    total = 2 * n_img - 1
    sums = torch.zeros(total, d, dtype=dtype, device=dev)
    sums[:n_img] = u
    counts = torch.zeros(total, dtype=dtype, device=dev)
    counts[:n_img] = 1
    left = torch.empty(max(n_img - 1, 0), dtype=torch.long, device=dev)
    right = torch.empty_like(left)
    loss = torch.empty(max(n_img - 1, 0), dtype=dtype, device=dev)
    extra = torch.zeros(n_img, 0, dtype=dtype, device=dev) if extra is None else extra.to(dtype)
    extras = torch.zeros(total, extra.shape[1], dtype=dtype, device=dev)
    extras[:n_img] = extra
    if n_img <= 1:
        return Merges(left, right, loss, sums, counts, extras)
    # slot k holds node slot_node[k]; a merge of slots i < j puts the new node in slot i and retires slot j
    slot_node = torch.arange(n_img, device=dev)
    f = mode_fit(u, counts[:n_img], sparsity)
    pair = _pair_losses(u, counts[:n_img], f, sparsity)
    inf = torch.tensor(float("inf"), dtype=dtype, device=dev)
    pair.fill_diagonal_(inf)
    best, partner = pair.min(dim=1)
    slots = torch.arange(n_img, device=dev)
    for t in range(n_img - 1):
        i = int(best.argmin())
        j = int(partner[i])
        i, j = min(i, j), max(i, j)
        a, b = int(slot_node[i]), int(slot_node[j])
        new = n_img + t
        left[t], right[t], loss[t] = a, b, pair[i, j]
        sums[new] = sums[a] + sums[b]
        counts[new] = counts[a] + counts[b]
        extras[new] = extras[a] + extras[b]
        slot_node[i] = new
        f_new = mode_fit(sums[new], counts[new], sparsity)
        f[i] = f_new
        # the new node's row: loss with every live slot
        live = torch.isfinite(best)
        s_live = sums[slot_node]
        row = f + f_new - mode_fit(s_live + sums[new], counts[slot_node] + counts[new], sparsity)
        row = torch.where(live, row, inf)
        row[i] = inf
        row[j] = inf
        pair[i], pair[:, i] = row, row
        pair[j], pair[:, j] = inf, inf
        best[j] = inf
        # rows whose best partner was i or j are re-scanned; the others only compare with the new node
        stale = live & ((partner == i) | (partner == j))
        stale[j] = False
        stale[i] = True
        if bool(stale.any()):
            idx = slots[stale]
            b_val, b_arg = pair[idx].min(dim=1)
            best[idx], partner[idx] = b_val, b_arg
        fresh = live & ~stale
        fresh[j] = False
        better = fresh & (row < best)
        best = torch.where(better, row, best)
        partner = torch.where(better, torch.full_like(partner, i), partner)
    return Merges(left, right, loss, sums, counts, extras)
