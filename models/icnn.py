"""Interpretable CNN (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018): `model=icnn`.

backbone -> L interpretable conv layers (3x3 conv + ReLU, then the position mask) -> global average pooling ->
linear head. Each filter of an interpretable layer is pushed by the filter loss (-MI between its feature maps and
the n^2 + 1 templates, models/icnn_templates.py) to fire on one part of one class at one location; the mask at its
argmax removes activations away from that location before the upper layers see them.

`model.interpretable=false` keeps the very same network (same layers, same initial weights for a given seed) without
masks and without the filter loss: the baseline the metrics in algorithms/icnn_metrics.py compare against.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from core import distributed as D
from models.backbones import feature_size
from models.cnn import PooledHeadClassifier
from core.errors import ConfigError
from models.icnn_templates import (apply_position_mask, batch_log_mean_exp, check_template_size, filter_loss,
                                   make_templates, position_masks, template_priors, template_scores)

LOSS_WEIGHT_MODES = ("fixed", "running_activation")
Z_ESTIMATES = ("batch", "running")


class PositionMask(nn.Module):
    """relu(x * T_mu_hat / tau) with mu_hat the argmax of each map (Sec. 3.1)."""

    def __init__(self, n: int, beta: float):
        super().__init__()
        self.register_buffer("masks", position_masks(n, beta), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_position_mask(x, self.masks)


class FilterAssignment(nn.Module):
    """Filter-to-class assignment: a moving average (momentum 0.9, as the official code) of each filter's mean
    activation on the images of each class; a filter belongs to the class where that average is highest."""

    def __init__(self, num_filters: int, num_classes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("class_activation", torch.zeros(num_filters, num_classes))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def filter_class(self) -> torch.Tensor:
        """[C] the class each filter belongs to."""
        return self.class_activation.argmax(dim=1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """x [B, C, n, n] (detached maps), labels [B]. Classes absent from the batch keep their average; a class seen
        for the first time starts at its batch mean (no bias towards the zero initialisation)."""
        onehot = F.one_hot(labels, self.class_activation.shape[1]).to(x.dtype)          # [B, K]
        sums = x.mean(dim=(2, 3)).t() @ onehot                                           # [C, K]
        counts = onehot.sum(dim=0)                                                       # [K]
        # every rank sees the same statistics (all images of the global batch), so the assignment never diverges
        stats = D.all_reduce_sum(torch.cat([sums, counts[None]], dim=0))
        sums, counts = stats[:-1], stats[-1]
        present = counts > 0
        batch_mean = sums / counts.clamp(min=1)
        blended = self.momentum * self.class_activation + (1 - self.momentum) * batch_mean
        new = torch.where(self.seen[None], blended, batch_mean)
        self.class_activation.copy_(torch.where(present[None], new, self.class_activation))
        self.seen |= present


class InterpretableConv(nn.Module):
    """One interpretable conv layer: `filters` (3x3 conv + ReLU, the maps x the filter loss shapes), `mask` (the
    position mask, identity in the baseline), the templates, the filter-to-class assignment and the running
    statistics of the loss (Z_T, mean activation)."""

    def __init__(self, in_channels: int, num_filters: int, n: int, num_classes: int, beta: float = 4.0,
                 interpretable: bool = True, assign_momentum: float = 0.9, z_momentum: float = 0.9):
        super().__init__()
        self.n = n
        self.filters = nn.Sequential(nn.Conv2d(in_channels, num_filters, 3, padding=1), nn.ReLU())
        self.mask = PositionMask(n, beta) if interpretable else nn.Identity()
        self.register_buffer("templates", make_templates(n, beta), persistent=False)
        self.register_buffer("priors", template_priors(n), persistent=False)
        self.assignment = FilterAssignment(num_filters, num_classes, assign_momentum)
        self.z_momentum = float(z_momentum)
        # log of the running mean over images of exp(tr(x . T)); Z_T of a batch of B images = B * that mean
        self.register_buffer("log_mean_exp", torch.zeros(num_filters, n * n + 1))
        self.register_buffer("log_z_ready", torch.zeros((), dtype=torch.bool))
        # cumulative mean of each filter's per-image max activation (the ports' loss weight)
        self.register_buffer("mean_max_activation", torch.zeros(num_filters))
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (masked maps for the upper layers, unmasked maps x)."""
        x = self.filters(h)
        return self.mask(x), x

    @torch.no_grad()
    def update_statistics(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.assignment.update(x, labels)
        peak = x.flatten(2).amax(dim=2)                                                 # [B, C]
        total = self.images_seen + x.shape[0]
        self.mean_max_activation += (peak.sum(0) - x.shape[0] * self.mean_max_activation) / total
        self.images_seen.copy_(total)
        batch = batch_log_mean_exp(template_scores(x, self.templates))
        if bool(self.log_z_ready):
            m = self.z_momentum  # log(m * Zbar + (1 - m) * Zbatch), in log space
            batch = torch.logaddexp(self.log_mean_exp + math.log(m), batch + math.log(1 - m))
        self.log_mean_exp.copy_(batch)
        self.log_z_ready.fill_(True)

    def filter_loss(self, x: torch.Tensor, labels: torch.Tensor, z_estimate: str = "batch") -> torch.Tensor:
        """[C] Loss_f = -MI(X; T) of every filter on this batch."""
        log_z = None
        if z_estimate == "running" and bool(self.log_z_ready):
            log_z = self.log_mean_exp + math.log(x.shape[0])
        return filter_loss(x, self.templates, self.priors, labels, self.assignment.filter_class, log_z)


class ICNNClassifier(PooledHeadClassifier):
    """`model=icnn`: a backbone, `num_layers` interpretable conv layers of `filters` filters, pooling, a linear head.

    Total loss = cross-entropy + sum over layers and filters of lambda_f * Loss_f, with lambda_f = loss_weight
    (`loss_weight_mode=fixed`) or loss_weight x the filter's running mean max activation (`running_activation`,
    the public PyTorch ports' form with loss_weight=5e-6).
    """

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 64, backbone: str = "small",
                 pretrained=None, widths=None, dropout: float = 0.0, interpretable: bool = True, filters: int = 128,
                 num_layers: int = 1, beta: float = 4.0, loss_weight: float = 1e-3, loss_weight_mode: str = "fixed",
                 z_estimate: str = "batch", z_momentum: float = 0.9, assign_momentum: float = 0.9, **kwargs):
        check_icnn_options(loss_weight, loss_weight_mode, z_estimate, z_momentum, assign_momentum, beta, filters,
                           num_layers)
        super().__init__(num_classes=num_classes, channels=channels, image_size=image_size, backbone=backbone,
                         pretrained=pretrained, widths=widths, dropout=dropout, **kwargs)
        self.interpretable = bool(interpretable)
        self.loss_weight, self.loss_weight_mode = float(loss_weight), loss_weight_mode
        self.z_estimate = z_estimate
        n = feature_size(self.backbone, channels, image_size, backbone)
        check_template_size(n, "datamodule.image_size")
        self.template_size = n
        c_in, layers = self.backbone.out_channels, []
        for _ in range(int(num_layers)):
            layers.append(InterpretableConv(c_in, int(filters), n, num_classes, beta, self.interpretable,
                                            assign_momentum, z_momentum))
            c_in = int(filters)
        self.icnn = nn.ModuleList(layers)
        self.head = self.build_head(c_in, num_classes)
        self.default_probe_layer = f"icnn.filters{len(layers)}"

    # ----- network -----------------------------------------------------------------------------------------
    def forward_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (logits, the unmasked maps x of every interpretable layer)."""
        h, maps = self.backbone(images), []
        for layer in self.icnn:
            h, x = layer(h)
            maps.append(x)
        return self.head(self.dropout(self.pool(h).flatten(1))), maps

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.backbone(images)
        for layer in self.icnn:
            h, _ = layer(h)
        return self.pool(h).flatten(1)

    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        layers = OrderedDict(self.backbone.probe_layers)
        for i, layer in enumerate(self.icnn, start=1):
            layers[f"icnn.filters{i}"] = layer.filters   # the filter's own map x (what the filter loss shapes)
            layers[f"icnn.masked{i}"] = layer.mask       # what the upper layers see
        return layers

    @property
    def template_layers(self) -> list[str]:
        """FilterTemplateModel (core/protocol.py): the probe layers of the filters' own maps, lowest first; none for
        the baseline (`interpretable=false`), whose filters have no templates and no assigned classes."""
        return [f"icnn.filters{i}" for i in range(1, len(self.icnn) + 1)] if self.interpretable else []

    def filter_class(self, layer: int = -1) -> torch.Tensor:
        """[C] the class each filter of an interpretable layer is assigned to."""
        return self.icnn[layer].assignment.filter_class

    # ----- loss ------------------------------------------------------------------------------------------------
    def model_step(self, batch, stage: str):
        images, y = batch[0], batch[1]
        outputs = self.forward_maps(images)
        loss, terms = self.compute_loss(outputs, y, stage)
        return loss, terms, outputs[0], y

    def compute_loss(self, outputs, y, stage):
        logits, maps = outputs
        ce = F.cross_entropy(logits, y)
        if not self.interpretable:
            return ce, {}
        weighted, mi = logits.new_zeros(()), logits.new_zeros(())
        for layer, x in zip(self.icnn, maps):
            if stage == "train":
                layer.update_statistics(x.detach(), y)
            loss_f = layer.filter_loss(x, y, self.z_estimate)                       # [C]
            weighted = weighted + (self.filter_weights(layer) * loss_f).sum()
            mi = mi + (-loss_f.detach()).mean()
        return ce + weighted, {"ce": ce.detach(), "filter_loss": weighted.detach(), "mi": mi / len(maps)}

    def filter_weights(self, layer: InterpretableConv) -> torch.Tensor | float:
        if self.loss_weight_mode == "running_activation":
            return self.loss_weight * layer.mean_max_activation
        return self.loss_weight


def check_icnn_options(loss_weight, loss_weight_mode, z_estimate, z_momentum, assign_momentum, beta, filters,
                       num_layers) -> None:
    if loss_weight is None or float(loss_weight) < 0 or not math.isfinite(float(loss_weight)):
        raise ConfigError(f"model.loss_weight={loss_weight}: the filter-loss weight lambda must be a finite number "
                          f">= 0 (0 keeps the masks but drops the filter loss; model.interpretable=false drops both)")
    if loss_weight_mode not in LOSS_WEIGHT_MODES:
        raise ConfigError(f"model.loss_weight_mode={loss_weight_mode!r}: choose one of {', '.join(LOSS_WEIGHT_MODES)}")
    if z_estimate not in Z_ESTIMATES:
        raise ConfigError(f"model.z_estimate={z_estimate!r}: choose one of {', '.join(Z_ESTIMATES)}")
    for name, m in (("z_momentum", z_momentum), ("assign_momentum", assign_momentum)):
        if not 0.0 <= float(m) < 1.0:
            raise ConfigError(f"model.{name}={m}: a moving-average momentum must lie in [0, 1)")
    if float(beta) <= 0:
        raise ConfigError(f"model.beta={beta}: the template slope beta must be > 0 (the paper uses 4)")
    if int(filters) < 1 or int(num_layers) < 1:
        raise ConfigError(f"model.filters={filters}, model.num_layers={num_layers}: both must be >= 1")
