"""A concept segmenter for `shapes` (the role of the Unified Perceptual Parsing network in GAN Dissection): a small
U-Net that labels every pixel with every concept it carries (multi-label: object, part, colour, texture; scenes are
image-level and labelled on all pixels), plus a class head on the pooled bottleneck. Trained on the ground-truth
masks of `shapes` (conf/model/segmenter.yaml). It offers `ConceptSegmenter` (core/protocol.py): the GAN methods
measure concepts on generated images with it, and its pooled features are the space of the domain Fréchet
distance. Logged: val/pixel_acc (all concept decisions of all pixels), val/miou and val/iou/<concept>, val/acc."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn

from core import distributed as D
from core.errors import ConfigError


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def dense_targets(seg: torch.Tensor, image_labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float 0/1 [B, C+1, H, W] from Broden label maps [B, L, sh, sw] and image-level labels [B, C+1]."""
    b, c1 = image_labels.shape
    t = torch.zeros(b, c1, *seg.shape[-2:], device=seg.device)
    t.scatter_(1, seg.long(), 1.0)       # map k of a pixel with id c sets channel c (id 0 = channel 0, dropped)
    t = torch.maximum(t, image_labels[:, :, None, None].float())
    t[:, 0] = 0
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="nearest")
    return t


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - the mean over concepts of the soft Dice coefficient 2 sum(p t) / (sum p + sum t) over the batch's pixels
    (p = sigmoid(logits)). Every concept counts equally however few pixels it covers, where the pixel-wise BCE lets
    the rare ones (objects, parts, colours: 0.3-3.5% of the pixels of shapes) be learned last or not at all."""
    p = logits.sigmoid()
    dims = (0, 2, 3)
    inter = (p * target).sum(dims)
    dice = (2 * inter + eps) / (p.sum(dims) + target.sum(dims) + eps)
    return 1 - dice.mean()


class ConceptSegmenterModule(LightningModule):
    """U-Net (widths[0] at full resolution, halving the resolution per further width) -> [B, C+1, H, W] logits."""

    def __init__(self, num_concepts: int, num_classes: int, concept_names: Sequence[str] | None = None,
                 concept_categories: Sequence[str] | None = None, channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64, 96), class_weight: float = 0.1, positive_weight: float = 5.0,
                 dice_weight: float = 1.0, optimizer: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        if int(num_concepts) < 1:
            raise ConfigError(f"model.num_concepts={num_concepts}: the segmenter needs at least one concept")
        self.num_concepts, self.num_classes = int(num_concepts), int(num_classes)
        self.concept_names = list(concept_names or ["-"] + [f"concept{i}" for i in range(1, self.num_concepts + 1)])
        self.concept_categories = list(concept_categories or [""] * (self.num_concepts + 1))
        if len(self.concept_names) != self.num_concepts + 1:
            raise ConfigError(f"model.concept_names has {len(self.concept_names)} entries; it needs num_concepts + 1 "
                              f"= {self.num_concepts + 1} (index 0 = unlabelled)")
        w = [int(x) for x in widths]
        self.down = nn.ModuleList([conv_block(channels, w[0])] + [conv_block(a, b) for a, b in zip(w, w[1:])])
        self.up = nn.ModuleList([conv_block(b + a, a) for a, b in zip(w[:-1], w[1:])])
        self.head = nn.Conv2d(w[0], self.num_concepts + 1, 1)
        self.classifier = nn.Linear(w[-1], self.num_classes)
        self.class_weight = float(class_weight)
        if float(positive_weight) <= 0:
            raise ConfigError(f"model.positive_weight={positive_weight}: a positive weight of the concept pixels")
        self.positive_weight = float(positive_weight)
        if float(dice_weight) < 0:
            raise ConfigError(f"model.dice_weight={dice_weight}: the weight of the soft-Dice term, >= 0 (0 = off)")
        self.dice_weight = float(dice_weight)
        self.optimizer_factory = optimizer
        self._val = None

    def setup(self, stage: str) -> None:
        # the vocabulary comes from the data when not configured, and is saved with the checkpoint (the GAN loads it)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "concept_names", None)
        if names is None or self.hparams.get("concept_names"):
            return
        if len(names) != self.num_concepts + 1:
            raise ConfigError(f"model.num_concepts={self.num_concepts} but the data has {len(names) - 1} concepts; "
                              f"set model.num_concepts={len(names) - 1}")
        cats = [dm.labelled("val").category_of(i) if i else "" for i in range(len(names))]
        self.concept_names, self.concept_categories = list(names), cats
        self.hparams["concept_names"], self.hparams["concept_categories"] = list(names), cats

    # ----- network ----------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = (x - 0.5) / 0.25
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [0, 1] -> (concept logits [B, C+1, H, W], class logits [B, K])."""
        feats = self.encode(x)
        h = feats[-1]
        for i, (skip, block) in enumerate(zip(reversed(feats[:-1]), reversed(self.up))):
            h = torch.cat([skip, F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)], 1)
            # the head reads the last block before its ReLU: behind a ReLU, a concept whose pixels all map to zero
            # features is stuck at sigmoid(bias) < 0.5 (seen: every colour at p 0.44-0.49 on its own pixels, IoU 0)
            h = block[:-1](h) if i == len(self.up) - 1 else block(h)
        return self.head(h), self.classifier(feats[-1].mean(dim=(2, 3)))

    # ----- ConceptSegmenter (core/protocol.py) --------------------------------------------------------------------
    def concept_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0].sigmoid()

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[-1].mean(dim=(2, 3))

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(x))

    # ----- training -----------------------------------------------------------------------------------------------
    def _step(self, batch, stage: str):
        x = batch["raw"]
        target = dense_targets(batch["seg"], batch["image_labels"], x.shape[-2:])
        if stage == "train" and torch.rand(()) < 0.5:   # flips keep every concept (the parts are top/bottom)
            x, target = x.flip(-1), target.flip(-1)
        logits, scores = self(x)
        # objects, parts and colours cover a few % of the pixels: without weighting their pixels the segmenter first
        # learns to label nothing but the scenes (seen in a 2-epoch run: IoU 0 for every object and colour)
        pos = torch.full((1, self.num_concepts, 1, 1), self.positive_weight, device=x.device)
        seg_loss = F.binary_cross_entropy_with_logits(logits[:, 1:], target[:, 1:], pos_weight=pos)
        if self.dice_weight:
            seg_loss = seg_loss + self.dice_weight * soft_dice_loss(logits[:, 1:], target[:, 1:])
        cls_loss = F.cross_entropy(scores, batch["label"])
        loss = seg_loss + self.class_weight * cls_loss
        self.log(f"{stage}/loss", loss.detach(), on_step=stage == "train", on_epoch=True, sync_dist=stage != "train",
                 prog_bar=True)
        self.log(f"{stage}/seg_loss", seg_loss.detach(), on_epoch=True, sync_dist=stage != "train")
        return loss, logits, scores, target

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")[0]

    def on_validation_epoch_start(self):
        self._val = torch.zeros(4, self.num_concepts + 1, dtype=torch.float64, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch, batch_idx, stage: str = "val"):
        _, logits, scores, target = self._step(batch, stage)
        pred, t = logits > 0, target > 0.5
        self._val[0] += (pred & t).sum(dim=(0, 2, 3)).double()
        self._val[1] += (pred | t).sum(dim=(0, 2, 3)).double()
        self._val[2] += (pred == t).sum(dim=(0, 2, 3)).double()
        self._val[3, 0] += float(pred[:, 0].numel())
        self._val[3, 1] += float((scores.argmax(-1) == batch["label"]).sum())
        self._val[3, 2] += float(len(scores))

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx, "test")

    def _epoch_end(self, stage: str):
        counts = D.all_reduce_sum(self._val)      # exact under DDP: sums of counts
        inter, union, correct = counts[0, 1:], counts[1, 1:], counts[2, 1:]
        present = union > 0
        iou = torch.where(present, inter / union.clamp_min(1), torch.zeros_like(inter))
        self.log(f"{stage}/miou", float(iou[present].mean()) if present.any() else 0.0, sync_dist=False)
        self.log(f"{stage}/pixel_acc", float(correct.sum() / (counts[3, 0] * self.num_concepts)))
        self.log(f"{stage}/acc", float(counts[3, 1] / counts[3, 2].clamp_min(1)), prog_bar=True)
        for c in range(self.num_concepts):
            if present[c]:
                self.log(f"{stage}/iou/{self.concept_names[c + 1]}", float(iou[c]))

    def on_validation_epoch_end(self):
        self._epoch_end("val")

    def on_test_epoch_end(self):
        self._epoch_end("test")

    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=2e-3))
        return factory(params=self.parameters())
