"""Which class a map explains: the predicted one (from the same forward pass), a fixed class, or one per image."""
from __future__ import annotations

import torch
from torch import Tensor

from core.probe import scores_fn

#: callbacks.attribution.target: the image's label ("true"; unlabelled probe items: the prediction) or the prediction
TARGETS = ("true", "predicted")


def resolve_target(target, scores: Tensor) -> Tensor:
    """The class explained for each image, as a LongTensor [B] on the scores' device.

    None or "predicted": argmax of `scores` (the same forward pass, no second one); an int: that class for all;
    a sequence/tensor of B ints (e.g. the true labels). Classes outside 0..K-1 raise ValueError."""
    B, K = scores.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        return scores.detach().argmax(1)
    if isinstance(target, str):
        raise ValueError(f"target={target!r}: use None or 'predicted' (argmax of the model's scores), a class index "
                         f"0..{K - 1}, or a tensor of {B} class indices (e.g. the true labels)")
    t = torch.as_tensor(target, device=scores.device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"target has {t.numel()} entries for a batch of {B} images; give one class per image")
    bad = (t < 0) | (t >= K)
    if bool(bad.any()):
        raise ValueError(f"target class {t[bad][:5].tolist()} out of range: the model has {K} classes "
                         f"(valid targets 0..{K - 1})")
    return t


def explained_classes(model, images: Tensor, labels: Tensor, target: str = "true") -> Tensor | None:
    """What a method is asked to explain: None (the prediction, picked by the method's own forward pass) for
    target="predicted", else the labels, with the prediction for unlabelled images (label < 0)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: use one of {', '.join(TARGETS)}")
    if target == "predicted":
        return None
    if bool((labels < 0).any()):
        with torch.no_grad():
            pred = scores_fn(model)(images).argmax(1)
        labels = torch.where(labels < 0, pred, labels)
    return labels
