"""Templates, position masks and the filter loss of the interpretable CNN (Zhang, Wu, Zhu, CVPR 2018, Sec. 3).

Plain tensor functions, vectorised over images, filters, positions and templates; models/icnn.py wires them into
the network. Conventions: a feature map is n x n; positions mu = (mu_i, mu_j) are 0-based and flattened row-major
(mu = mu_i * n + mu_j); the n^2 positive templates come first and the negative template is the last one.
"""
from __future__ import annotations

import math

import torch

from core.errors import ConfigError

#: below 3x3 every positive template covers the whole map, so "one part at one location" cannot be expressed
MIN_TEMPLATE_SIZE = 3


def template_tau(n: int) -> float:
    """tau = 0.5 / n^2 (Sec. 3.1): the scale of every template."""
    return 0.5 / (n * n)


def check_template_size(n: int, option: str = "datamodule.image_size") -> None:
    if int(n) < MIN_TEMPLATE_SIZE:
        raise ConfigError(
            f"the interpretable conv layer's feature map is {n}x{n}, too small for the icnn templates (need at least "
            f"{MIN_TEMPLATE_SIZE}x{MIN_TEMPLATE_SIZE}): raise {option} or use a backbone that downsamples less "
            f"(model.backbone=small)")


def position_masks(n: int, beta: float = 4.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """[n^2, n, n]: max(1 - beta * ||(i, j) - mu||_1 / n, -1) for every position mu — the positive templates
    without the tau scale, i.e. the masks of the forward pass (Sec. 3.1, "masks")."""
    check_template_size(n, "the template size n")
    idx = torch.arange(n, dtype=dtype, device=device)
    di = (idx[:, None] - idx[None, :]).abs()                      # [mu_i, i]
    l1 = di[:, None, :, None] + di[None, :, None, :]               # [mu_i, mu_j, i, j]
    return torch.clamp(1.0 - beta * l1 / n, min=-1.0).reshape(n * n, n, n)


def make_templates(n: int, beta: float = 4.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """[n^2 + 1, n, n]: the positive templates T_mu = tau * max(1 - beta * L1(i,j; mu) / n, -1) for all mu,
    followed by the negative template T^- = -tau everywhere."""
    tau = template_tau(n)
    positive = tau * position_masks(n, beta, dtype, device)
    negative = torch.full((1, n, n), -tau, dtype=dtype, device=device)
    return torch.cat([positive, negative], dim=0)


def template_priors(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[n^2 + 1]: p(T_mu) = alpha / n^2, p(T^-) = 1 - alpha, alpha = n^2 / (1 + n^2), so that every one of the
    n^2 + 1 templates has the same prior 1 / (1 + n^2)."""
    n2 = n * n
    alpha = n2 / (1.0 + n2)
    priors = torch.full((n2 + 1,), alpha / n2, dtype=dtype, device=device)
    priors[-1] = 1.0 - alpha
    return priors


def peak_positions(x: torch.Tensor) -> torch.Tensor:
    """[B, C] flattened argmax mu_hat of each filter's map x [B, C, n, n]."""
    return x.flatten(2).argmax(dim=2)


def apply_position_mask(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """relu(x * T_mu_hat / tau): each map times the mask centred at its own argmax (mu_hat is a constant, as in
    the paper: the mask selects, it is not differentiated)."""
    mu_hat = peak_positions(x.detach())
    return torch.relu(x * masks[mu_hat])


def allowed_pairs(labels: torch.Tensor, filter_class: torch.Tensor, num_templates: int) -> torch.Tensor:
    """[B, C, n^2 + 1] bool: which (image, filter, template) triples enter the mutual information. An image of the
    filter's class may match any positive template; an image of another class only the negative template."""
    positive = labels[:, None] == filter_class[None, :]                    # [B, C]
    pos = positive[:, :, None].expand(-1, -1, num_templates - 1)
    return torch.cat([pos, ~positive[:, :, None]], dim=2)


def template_scores(x: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """[B, C, T]: tr(x . T) = sum_ij x_ij T_ij for every image, filter and template (one matmul)."""
    return x.flatten(2) @ templates.flatten(1).t()


def log_p_x_given_t(scores: torch.Tensor, log_z: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | T) = tr(x . T) - log Z_T. With log_z None, Z_T = sum over the batch of exp(tr(x . T)) (a softmax
    over the batch, as the ports do); otherwise the given [C, T] log Z_T (a running estimate, a constant)."""
    if log_z is None:
        return scores - torch.logsumexp(scores, dim=0, keepdim=True)
    return scores - log_z.unsqueeze(0)


def filter_mutual_information(log_p_xt: torch.Tensor, priors: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[C]: MI(X; T) = sum_T p(T) sum_x p(x|T) log(p(x|T) / p(x)) per filter, p(x) = sum_T p(T) p(x|T).

    The sum runs over the (x, T) pairs the labels allow (`allowed_pairs`); p(x|T) and p(x) keep every image and
    template of the batch, so an image of another class that fits a positive template lowers the MI (it takes
    probability mass p(x|T_mu) away from the filter's own images) and is pushed towards the negative template.
    """
    log_prior = priors.log()
    log_p_x = torch.logsumexp(log_p_xt + log_prior, dim=2, keepdim=True)    # [B, C, 1]
    terms = priors * log_p_xt.exp() * (log_p_xt - log_p_x)
    return torch.where(allowed, terms, torch.zeros_like(terms)).sum(dim=(0, 2))


def filter_loss(x: torch.Tensor, templates: torch.Tensor, priors: torch.Tensor, labels: torch.Tensor,
                filter_class: torch.Tensor, log_z: torch.Tensor | None = None) -> torch.Tensor:
    """[C]: Loss_f = -MI(X; T) for each filter of the maps x [B, C, n, n] (Sec. 3.2)."""
    scores = template_scores(x, templates)
    allowed = allowed_pairs(labels, filter_class, templates.shape[0])
    return -filter_mutual_information(log_p_x_given_t(scores, log_z), priors, allowed)


def batch_log_mean_exp(scores: torch.Tensor) -> torch.Tensor:
    """[C, T]: log( mean over the batch of exp(tr(x . T)) ), the per-image part of Z_T."""
    return torch.logsumexp(scores, dim=0) - math.log(scores.shape[0])
