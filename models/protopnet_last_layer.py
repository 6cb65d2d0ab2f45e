"""The last-layer phase of ProtoPNet (Chen et al. 2019, Sec. 2.2, "convex optimization of last layer") as the convex
problem it is. With the backbone, the add-on layers and the prototypes frozen, the prototype similarities S [N, m] of
the training set are fixed numbers, computed once (`training_similarities`), and the last layer W [K, m] minimises

    F(W) = f(W) + g(W),   f(W) = (1/N) sum_i CE(W s_i, y_i) + (mu / 2) ||W||^2,
                          g(W) = lambda * sum_{c, j not in P_c} |W_cj|

(only the weights from a prototype to the classes it does not belong to get the L1 penalty). Without the small ridge
term mu the problem often has no minimiser: on training similarities that the own-class weights alone separate, the
cross-entropy keeps falling as those unpenalised weights grow, so "the optimum" would be wherever a solver stops
(the public code stops after 20 epochs of Adam at lr 1e-4). mu > 0 makes F strongly convex: one optimum, reached
from any start. f is smooth and convex, g
convex with a closed-form proximal map (soft-thresholding of the off-class entries), so FISTA (Beck & Teboulle 2009)
solves it to the optimum: full-batch accelerated proximal gradient, backtracking on the step, and O'Donoghue &
Candes' (2015) function-value restart. Optimality is certified by the KKT conditions 0 in grad f(W) + d g(W):

(grad = grad f, the ridge term included)
    own-class W_cj:                grad_cj = 0
    off-class W_cj != 0:           grad_cj = -lambda sign(W_cj)
    off-class W_cj == 0:           |grad_cj| <= lambda

`kkt_residual` is the largest violation (the max-norm of the minimum-norm subgradient); the solver stops when it is
below `tol`. The epoch-based alternative of the public code (Adam on mini-batches of images, a few epochs) stops
wherever its epochs end; `last_layer_objective` evaluates both on the same S (benchmarks/bench_last_layer.py).

Nothing here knows ProtoPNet beyond `prototype_outputs(x).similarities` and `prototype_class_identity`: the model
(models/protopnet.py), the benchmark and the tests call it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from core import distributed as D
from core.errors import ConfigError

#: the objective is recorded at most this many times per solve (evenly spaced iterations, the last one included)
HISTORY_POINTS = 50


@dataclass
class LastLayerFit:
    """The result of one convex solve: the weights and how the objective converged."""

    weight: Tensor                  # [K, m] the solution (float64, on the solver's device)
    objective: float                # F(W) at the solution
    cross_entropy: float            # mean CE(W s_i, y_i)
    l1: float                       # sum of |off-class W| (g / lambda)
    initial_objective: float        # F(W0)
    iterations: int
    kkt_residual: float             # max KKT violation at the solution (0 at the exact optimum)
    converged: bool                 # kkt_residual <= tol within max_iter
    seconds: float
    images: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (iteration, F) along the way

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers (the push history entry and the log line carry them)."""
        return {"solver": "convex", "objective": self.objective, "cross_entropy": self.cross_entropy,
                "l1": self.l1, "initial_objective": self.initial_objective, "iterations": self.iterations,
                "kkt_residual": self.kkt_residual, "converged": self.converged, "seconds": round(self.seconds, 4),
                "images": self.images, "history": [[int(i), float(v)] for i, v in self.history]}


def off_class_mask(prototype_class_identity: Tensor) -> Tensor:
    """[K, m] 1 where prototype j does not belong to class c (the penalised weights), from the one-hot [m, K]."""
    return 1 - prototype_class_identity.t()


def last_layer_objective(weight: Tensor, sims: Tensor, labels: Tensor, off_class: Tensor, l1: float,
                         l2: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(F, mean CE, sum |off-class W|) for weights [K, m], similarities [N, m], labels [N], off-class mask [K, m]."""
    ce = F.cross_entropy(sims @ weight.t(), labels)
    norm = (weight * off_class).abs().sum()
    return ce + l1 * norm + 0.5 * l2 * weight.square().sum(), ce, norm


def _smooth(weight: Tensor, sims: Tensor, onehot: Tensor, l2: float) -> tuple[Tensor, Tensor, Tensor]:
    """(f(W), grad f(W), mean CE) with grad f = (softmax(S W^T) - Y)^T S / N + mu W."""
    logits = sims @ weight.t()
    logp = logits.log_softmax(dim=1)
    ce = -(logp * onehot).sum() / len(sims)
    grad = (logp.exp() - onehot).t() @ sims / len(sims) + l2 * weight
    return ce + 0.5 * l2 * weight.square().sum(), grad, ce


def _prox(weight: Tensor, step: float, l1: float, off_class: Tensor) -> Tensor:
    """argmin_V g(V) + ||V - W||^2 / (2 step): soft-thresholding of the off-class entries, own-class ones kept."""
    thr = step * l1 * off_class
    return weight.sign() * (weight.abs() - thr).clamp_min(0)


def kkt_residual(weight: Tensor, grad: Tensor, l1: float, off_class: Tensor) -> Tensor:
    """Max over entries of the distance of -grad f(W) to lambda * d|.|(W) (off-class) or to 0 (own-class)."""
    own = grad.abs() * (1 - off_class)
    nonzero = (grad + l1 * weight.sign()).abs()
    zero = (grad.abs() - l1).clamp_min(0)
    off = torch.where(weight != 0, nonzero, zero) * off_class
    return torch.maximum(own, off).max()


def lipschitz_bound(sims: Tensor, l2: float = 0.0) -> float:
    """A global Lipschitz constant of grad f: the softmax cross-entropy's Hessian in the logits is <= I / 2
    (Boehning 1992), so L = lambda_max(S^T S / N) / 2 + mu."""
    gram = sims.t() @ sims / len(sims)
    return float(torch.linalg.eigvalsh(gram)[-1]) / 2 + l2


def fit_last_layer(sims: Tensor, labels: Tensor, off_class: Tensor, l1: float, l2: float = 0.0,
                   weight0: Tensor | None = None, max_iter: int = 5000, tol: float = 1e-6) -> LastLayerFit:
    """FISTA on F (see `_fista`). On the CPU with one intra-op thread: the problem's ops are small, and a thread
    pool that waits for descheduled workers made the solve 3-4x slower on the shared 2-core machine (docs)."""
    if sims.device.type != "cpu":
        return _fista(sims, labels, off_class, l1, l2, weight0, max_iter, tol)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fista(sims, labels, off_class, l1, l2, weight0, max_iter, tol)
    finally:
        torch.set_num_threads(threads)


def _fista(sims: Tensor, labels: Tensor, off_class: Tensor, l1: float, l2: float, weight0: Tensor | None,
           max_iter: int, tol: float) -> LastLayerFit:
    """Minimise F (module docstring) over W [K, m] by FISTA with backtracking and restart, from weight0 (default 0).

    sims [N, m], labels [N] long, off_class [K, m] (`off_class_mask`), l1 = lambda, l2 = mu. Computed in float64 on the
    device of `sims` (the problem is small: N x m numbers). Stops when the KKT residual <= tol or after max_iter
    iterations."""
    start = time.perf_counter()
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1={l1}, l2={l2}: the coefficients must be >= 0")
    sims = sims.double()
    off = off_class.to(sims).double()
    k = off.shape[0]
    onehot = F.one_hot(labels.long(), k).to(sims)
    w = (weight0.detach().to(sims).clone() if weight0 is not None else sims.new_zeros(k, sims.shape[1]))
    l_max = lipschitz_bound(sims, l2)
    lip = max(l_max / 64, 1e-12)  # start optimistic; backtracking raises it where the curvature needs it
    y, w_prev, t = w.clone(), w.clone(), 1.0
    f_w, grad_w, _ = _smooth(w, sims, onehot, l2)
    obj = float(f_w + l1 * (w * off).abs().sum())
    initial = obj
    history = [(0, obj)]
    residual = float(kkt_residual(w, grad_w, l1, off))
    every = max(1, max_iter // HISTORY_POINTS)
    it = 0
    while residual > tol and it < max_iter:
        it += 1
        f_y, grad_y, _ = _smooth(y, sims, onehot, l2)
        lip *= 0.9  # let the step grow again where the curvature is lower (a non-monotone backtracking)
        while True:
            step = 1.0 / lip
            w_new = _prox(y - step * grad_y, step, l1, off)
            diff = w_new - y
            f_new, grad_new, _ = _smooth(w_new, sims, onehot, l2)
            # sufficient decrease of the quadratic upper model (Beck & Teboulle's backtracking condition)
            if float(f_new) <= float(f_y + (grad_y * diff).sum() + 0.5 * lip * diff.square().sum()) + 1e-15 \
                    or lip >= l_max:
                break
            lip = min(2 * lip, l_max)
        obj_new = float(f_new + l1 * (w_new * off).abs().sum())
        if obj_new > obj:
            if t == 1.0:
                break  # even a plain proximal step from w fails to decrease F: the floating-point floor
            # function-value restart: drop the momentum and take a plain proximal step from w instead
            t, y = 1.0, w.clone()
            continue
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = w_new + ((t - 1) / t_next) * (w_new - w)
        w_prev, w, t = w, w_new, t_next
        obj, grad_w = obj_new, grad_new
        residual = float(kkt_residual(w, grad_w, l1, off))
        if it % every == 0:
            history.append((it, obj))
    f_w, grad_w, ce = _smooth(w, sims, onehot, l2)
    norm = float((w * off).abs().sum())
    if history[-1][0] != it:
        history.append((it, obj))
    return LastLayerFit(weight=w, objective=float(f_w) + l1 * norm, cross_entropy=float(ce), l1=norm,
                        initial_objective=initial, iterations=it,
                        kkt_residual=float(kkt_residual(w, grad_w, l1, off)), converged=residual <= tol,
                        seconds=time.perf_counter() - start, images=len(sims), history=history)


@torch.no_grad()
def training_similarities(model, batches: Iterable) -> tuple[Tensor, Tensor]:
    """(S [N, m], labels [N]) of every image of `batches` ((images, labels, ...)), with the model as it is (the
    caller puts it in eval mode: BatchNorm running statistics, as at test time). Under DDP every rank passes its
    shard and gets the whole set, in rank order (the same on every rank)."""
    device = model.prototype_vectors.device
    sims, labels = [], []
    for batch in batches:
        x, y = batch[0].to(device), batch[1].to(device)
        sims.append(model.prototype_outputs(x).similarities)
        labels.append(y)
    m = model.prototype_vectors.shape[0]
    s = torch.cat(sims) if sims else torch.zeros(0, m, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return D.all_gather_cat(s), D.all_gather_cat(y)


def same_on_every_rank(weight: Tensor) -> Tensor:
    """Rank 0's weights on every rank (the ranks solve the same problem; this removes any floating-point doubt)."""
    return D.all_gather_cat(weight[None])[0] if D.is_distributed() else weight


SOLVERS = ("convex", "epochs")


@dataclass
class LastLayerSettings:
    """`model.last_layer_fit`: how the last layer is trained after each push. convex: the problem above solved
    right after the push (the last-layer epochs then only evaluate); epochs: the public code's Adam on mini-batches
    for `model.schedule.last_layer_epochs` epochs (lr `model.phase_lrs.last_layer`, L1 `model.coefs.l1`)."""

    solver: str = "convex"
    l1: float = 1e-3
    l2: float = 1e-4
    max_iter: int = 5000
    tol: float = 1e-6

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ConfigError(f"model.last_layer_fit.solver={self.solver!r}: choose one of {', '.join(SOLVERS)}")
        for key in ("l1", "l2", "tol"):
            if not float(getattr(self, key)) >= 0:
                raise ConfigError(f"model.last_layer_fit.{key}={getattr(self, key)}: must be >= 0")
        if int(self.max_iter) < 1:
            raise ConfigError(f"model.last_layer_fit.max_iter={self.max_iter}: must be >= 1")
