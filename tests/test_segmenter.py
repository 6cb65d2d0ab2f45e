"""The concept segmenter's loss and head: the soft-Dice term by hand, and the head reading features that can be
negative (behind a ReLU, a concept whose pixels all map to zero features stays at sigmoid(bias) < 0.5)."""
from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from models.segmenter import ConceptSegmenterModule, soft_dice_loss


def test_soft_dice_loss_by_hand():
    # two concepts over a batch of one 1x2 image: p = sigmoid(logits)
    logits = torch.tensor([[[[0.0, 2.0]], [[-1.0, -1.0]]]])
    target = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])
    p = torch.sigmoid(logits)
    d0 = (2 * p[0, 0, 0, 1] * 1 + 1) / (p[0, 0].sum() + 1 + 1)
    d1 = (0 + 1) / (p[0, 1].sum() + 0 + 1)
    assert float(soft_dice_loss(logits, target)) == pytest.approx(float(1 - (d0 + d1) / 2), abs=1e-7)
    # a perfect, saturated prediction has a Dice of 1 for the present concept and ~1 for the absent one
    sure = torch.tensor([[[[-30.0, 30.0]], [[-30.0, -30.0]]]])
    assert float(soft_dice_loss(sure, target)) == pytest.approx(0.0, abs=1e-6)


def test_the_head_reads_features_before_the_last_relu():
    torch.manual_seed(0)
    model = ConceptSegmenterModule(num_concepts=3, num_classes=2, widths=(8, 16)).eval()
    seen = {}
    model.head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    model(torch.rand(2, 3, 16, 16))
    assert seen["x"].shape == (2, 8, 16, 16)
    assert float(seen["x"].min()) < 0  # a ReLU output would be >= 0


def test_negative_dice_weight_is_refused():
    with pytest.raises(ConfigError, match="model.dice_weight"):
        ConceptSegmenterModule(num_concepts=3, num_classes=2, dice_weight=-1)
