"""The plain CNN baseline: a backbone, global average pooling and a linear head."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from models.backbones import build_backbone
from models.base import ClassifierModule

log = logging.getLogger(__name__)


class PooledHeadClassifier(ClassifierModule):
    """backbone -> global average pooling -> head. The head maps pooled features [B, D] to logits [B, K];
    cnn uses nn.Linear, dynconn swaps in the Dynamic-K layer (models/dynconn.py)."""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 64, backbone: str = "small",
                 pretrained=None, widths=None, dropout: float = 0.0, **kwargs):
        super().__init__(num_classes=num_classes, channels=channels, image_size=image_size, **kwargs)
        self.save_hyperparameters(logger=False)
        self.backbone = build_backbone(backbone, channels, image_size, pretrained=pretrained, widths=widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = self.build_head(self.backbone.out_channels, num_classes)
        self.default_probe_layer = next(reversed(self.backbone.probe_layers))

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, non-negative unit activations [B, D] (the units of the last conv layer)."""
        return self.pool(self.backbone(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict(self.backbone.probe_layers)

    # ----- UnitHead (core/protocol.py): the decision is a sum over the pooled units of the default probe layer ----
    @property
    def unit_layer(self) -> str:
        return self.default_probe_layer

    def unit_contributions(self, x):
        return self.features(x), self.head.weight


class CNNClassifier(PooledHeadClassifier):
    """`model=cnn`: the dense baseline.

    `k` is accepted so that one sweep can cover the baseline and the Dynamic-K head
    (`python train.py -m model=cnn,dynconn model.k=5,10`); the dense head uses every unit, so a set `k` only
    produces a warning and is recorded with the run."""

    def __init__(self, num_classes: int, k: int | None = None, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)
        if k is not None:
            log.warning("model=cnn has a dense linear head: model.k=%s has no effect (this job is the dense "
                        "baseline of a sweep over k; model=dynconn uses k)", k)
