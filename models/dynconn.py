"""The dynamic connection layer = Dynamic-K activation (Sun, Ravi & Singh, ICCV 2019), `model=dynconn`.

It replaces the final fully connected layer on globally pooled, non-negative features x [B, D]:
  votes       v_cj = W_cj x_j
  class score z_c  = (sum of the K largest votes of class c) + b_c
The K-th largest vote is a per-sample, per-class adaptive threshold, so each class listens to a small,
input-dependent support of units (dynamic routing behaviour). Gradients reach only the K selected connections of each
(sample, class); unselected weights feel only weight decay and W becomes sparse over training. No extra loss term.

Speed: on the CPU (float32, non-negative features) forward and backward run in a small compiled kernel
(models/csrc/dynamic_k.c, built on first use by models/dynk_kernel.py): per sample it visits the units in descending
x order and keeps each class's K largest votes in SIMD registers, 8 classes at a time, until the bound
x_next * max_j W_cj proves that no later unit can enter; the backward pass touches only the B x C x K selected
connections. Elsewhere (GPU, other dtypes, no C compiler) the selection runs in torch without autograd: the votes of
each sample's 64 largest features first, then the same bound per (sample, class), and all D votes for the pairs it
cannot decide (in blocks that bound their memory); only the K selected (x_j, W_cj) pairs are gathered with gradients.
Both give the exact top-K. With K = D the layer is exactly `F.linear`.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from models import dynk_kernel
from models.cnn import PooledHeadClassifier
from core.errors import ConfigError

#: votes held at once during the selection (floats): 16M floats = 64 MB bounds the memory of the no-grad vote block
SELECTION_BLOCK = 1 << 24
#: features per sample whose votes decide the selection first (see DynamicKLinear.select)
CANDIDATES = 64


class _KernelDeclined(Exception):
    """The CPU kernel found a negative or non-finite feature: its bound does not hold, use the torch selection."""


class _DynamicKFunction(torch.autograd.Function):
    """z = (sum of the K largest votes) + b through the compiled CPU kernel; the backward pass reaches only the
    selected connections (the kernel's indices are saved for it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, k):
        result = dynk_kernel.forward(x, weight, bias, k)
        if result is None:
            raise _KernelDeclined
        out, index = result
        ctx.save_for_backward(x, weight, index)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, index = ctx.saved_tensors
        gx, gw = dynk_kernel.backward(grad, x, weight, index, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, grad.sum(0) if ctx.needs_input_grad[2] else None, None


class DynamicKLinear(nn.Module):
    """Dynamic-K activation layer: in_features D -> out_features C with K routed connections per sample and class."""

    def __init__(self, in_features: int, out_features: int, k: int):
        super().__init__()
        if isinstance(k, bool) or not (isinstance(k, numbers.Integral) or isinstance(k, float) and k.is_integer()):
            # int(2.7) would silently train with K=2
            raise ConfigError(f"model.k={k!r}: K counts connections, so it must be an integer in [1, {in_features}]")
        if not 1 <= int(k) <= int(in_features):
            raise ConfigError(f"model.k={k}: the Dynamic-K head selects K of the {in_features} pooled features per "
                              f"class, so K must lie in [1, {in_features}] (the paper uses 5 on Places365)")
        self.in_features, self.out_features, self.k = int(in_features), int(out_features), int(k)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so that K = D starts from the same function as the dense head
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def dense(self) -> bool:
        return self.k == self.in_features

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Indices [B, C, K] of the K largest votes W_cj x_j per sample and class (no gradient needed).

        On the CPU the compiled kernel selects them (see the module docstring). Otherwise: exact in two stages when
        the features are non-negative (pooled ReLU maps) and D is large: the votes of each sample's CANDIDATES largest
        features decide every (sample, class) whose K-th best candidate vote beats the bound x_(M+1) * max_j W_cj on
        any other unit's vote; only the remaining pairs get all D votes. Otherwise (or for small D) all votes are
        formed."""
        w, x = self.weight.detach(), x.detach()
        if dynk_kernel.applies(x, w, self.bias, self.k):
            result = dynk_kernel.forward(x, w, self.bias, self.k)
            if result is not None:
                return result[1].long()
        m = max(CANDIDATES, 4 * self.k)
        if m < x.shape[1] and bool((x >= 0).all()):
            return self._select_pruned(x, w, m)
        return self._select_all(x, w)

    def _select_all(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        B, D = x.shape
        rows = max(1, SELECTION_BLOCK // (self.out_features * D))
        out = torch.empty(B, self.out_features, self.k, dtype=torch.long, device=x.device)
        for start in range(0, B, rows):
            votes = x[start:start + rows, None, :] * w  # [b, C, D]
            out[start:start + rows] = votes.topk(self.k, dim=-1, sorted=False).indices
        return out

    def _select_pruned(self, x: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
        B, C, K = x.shape[0], self.out_features, self.k
        xs, order = x.topk(m + 1, dim=1)                                   # each sample's m+1 largest features
        cand = order[:, :m]                                                # [B, m]
        votes = (xs[:, :m, None] * w.t().contiguous()[cand]).transpose(1, 2)  # [B, C, m]
        top = votes.topk(K, dim=-1, sorted=False)
        kth = top.values.min(dim=-1).values                                # K-th best candidate vote [B, C]
        # no unit outside the candidates has x_j > x_(m+1), so its vote is at most max(x_(m+1) * max_j W_cj, 0)
        bound = (xs[:, m, None] * w.max(dim=1).values[None, :]).clamp_min(0)
        index = cand.gather(1, top.indices.reshape(B, C * K)).view(B, C, K)
        b, c = (bound >= kth).nonzero(as_tuple=True)                       # undecided pairs: all D votes
        step = max(1, SELECTION_BLOCK // x.shape[1])  # blocks of pairs bound the memory of their [n, D] votes
        for start in range(0, b.numel(), step):
            bb, cc = b[start:start + step], c[start:start + step]
            index[bb, cc] = (x[bb] * w[cc]).topk(K, dim=-1, sorted=False).indices
        return index

    def routed(self, x: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected votes [B, C, K] with gradients to x and W, their feature indices [B, C, K])."""
        B, D = x.shape
        C, K = self.out_features, self.k
        index = self.select(x) if index is None else index
        x_sel = x.gather(1, index.view(B, C * K)).view(B, C, K)
        # flat indices into W so that autograd's backward is one index_add into [C * D], not a [B, C, D] buffer
        flat = (torch.arange(C, device=x.device).view(1, C, 1) * D + index).view(-1)
        w_sel = self.weight.reshape(-1).index_select(0, flat).view(B, C, K)
        return x_sel * w_sel, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:  # the sum of all D votes is the linear layer; use the GEMM
            return F.linear(x, self.weight, self.bias)
        if dynk_kernel.applies(x, self.weight, self.bias, self.k):
            try:
                return _DynamicKFunction.apply(x, self.weight, self.bias, self.k)
            except _KernelDeclined:
                pass
        votes, _ = self.routed(x)
        return votes.sum(-1) + self.bias

    def routed_mask(self, x: torch.Tensor) -> torch.Tensor:
        """bool [B, C, D]: which connections (sample, class, unit) carry evidence in this forward pass."""
        B, D = x.shape
        mask = torch.zeros(B, self.out_features, D, dtype=torch.bool, device=x.device)
        return mask.scatter_(2, self.select(x), True)

    def unit_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, D]: the evidence s_cj = x_j W_cj each unit actually contributes to z_c (0 where not routed);
        its sum over units is z_c - b_c."""
        B, D = x.shape
        votes, index = self.routed(x)
        return torch.zeros(B, self.out_features, D, dtype=votes.dtype, device=x.device).scatter(2, index, votes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}"


class DynConnClassifier(PooledHeadClassifier):
    """`model=dynconn`: any backbone -> GAP -> Dynamic-K head. Shares everything else with `model=cnn`."""

    def __init__(self, num_classes: int, k: int = 5, head_weight_decay: float | None = 1e-4, **kwargs):
        # build_head runs inside the parent's __init__, before nn.Module state exists: store K as a plain attribute
        object.__setattr__(self, "_k_config", int(k))
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters(logger=False)
        if head_weight_decay is not None and head_weight_decay < 0:
            raise ConfigError(f"model.head_weight_decay={head_weight_decay}: must be >= 0 (or null for the "
                              f"optimiser's own weight_decay)")
        self.head_weight_decay = head_weight_decay

    def parameter_groups(self):
        """The head's weights get their own weight decay: unrouted connections receive no gradient and only this
        decay, which is what makes W sparse over training (Sec. 3 of the paper); null = the optimiser's setting."""
        if self.head_weight_decay is None:
            return super().parameter_groups()
        head_w = self.head.weight
        rest = [p for p in self.parameters() if p.requires_grad and p is not head_w]
        return [{"params": rest}, {"params": [head_w], "weight_decay": float(self.head_weight_decay)}]

    @property
    def k(self) -> int:
        return self._k_config

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        return DynamicKLinear(in_features, num_classes, self._k_config)

    def routed_mask(self, units: torch.Tensor) -> torch.Tensor:
        """RoutedUnitHead (core/protocol.py): the top-K connections per class for pooled features [B, D]."""
        return self.head.routed_mask(units)

    def unit_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample, per-class evidence actually used [B, C, D] (x_j W_cj on the routed top-K, 0 elsewhere)."""
        return self.head.unit_evidence(self.features(x))

    def unit_contributions(self, x):
        """(features [B, D], weights [C, D]) as for the dense head; x_j W_cj is the vote of unit j, but only the
        top-K votes count -- `routed_mask(features)` / `unit_evidence` give the evidence actually routed."""
        return self.features(x), self.head.weight
