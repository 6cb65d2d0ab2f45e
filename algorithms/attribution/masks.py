"""Probe images as batches for evaluation: the ground-truth object mask of each probe item, and the collation of
items (image, raw image, label, mask). Data without a probe set gives (image, label) items without masks."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

#: where interpretation methods may read probe images from
SPLITS = ("train", "val", "test")


class ProbeMasks:
    """Ground-truth object masks of probe items: the pixels carrying all pixel-level defining concepts of the image's
    class (on `shapes`: the main object, never a distractor — those use colours no class uses); image-level labels
    count as full-image masks (Broden). Without class_concepts: every object-category pixel."""

    def __init__(self, probe):
        cats = list(getattr(probe, "concept_categories", []))
        self.object_ids = [i for i, c in enumerate(cats) if c == "object"]
        self.class_concepts = {int(k): [int(c) for c in v] for k, v in
                               (getattr(probe, "class_concepts", None) or {}).items()}

    def __call__(self, item: dict) -> Tensor:
        seg, labels = item["seg"], item.get("image_labels")
        label = int(item.get("label", -1))
        concepts = self.class_concepts.get(label) if label >= 0 else None
        if not concepts:
            return torch.isin(seg, torch.tensor(self.object_ids, dtype=seg.dtype)).any(0) if self.object_ids else \
                torch.zeros(seg.shape[-2:], dtype=torch.bool)
        mask = torch.ones(seg.shape[-2:], dtype=torch.bool)
        for c in concepts:  # a handful of defining concepts per class
            present = (seg == c).any(0)
            if not bool(present.any()) and labels is not None and c < len(labels) and bool(labels[c]):
                continue  # image-level label: full-image mask, the intersection is unchanged
            mask &= present
        return mask


def collate_probe(items: list[dict], masks: ProbeMasks | None) -> dict[str, Tensor]:
    """Probe items -> a batch {image, label, raw (None without raw images), mask (with `masks` and segmentations)}."""
    out = {"image": torch.stack([it["image"] for it in items]),
           "label": torch.stack([torch.as_tensor(it.get("label", -1)).long() for it in items])}
    out["raw"] = torch.stack([it["raw"] for it in items]) if "raw" in items[0] else None
    if masks is not None and "seg" in items[0]:
        out["mask"] = torch.stack([masks(it) for it in items])
    return out


class PairsAsItems(Dataset):
    """(image, label) datasets (no probe set) seen as probe items without masks."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i][:2]
        return {"image": x, "label": torch.as_tensor(y)}


def probe_items(datamodule, split: str = "val", limit: int | None = None) -> tuple[Subset, ProbeMasks | None]:
    """(the first `limit` probe items of `split`, their mask maker), from the datamodule's concept-annotated probe
    set when it has one, else from its normalised, unaugmented (image, label) split without masks."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    probe = datamodule.probe_dataset(split) if hasattr(datamodule, "probe_dataset") else None
    if probe is not None:
        ds, masks = probe, ProbeMasks(probe)
    else:
        loaders = {"val": "val_dataloader", "test": "test_dataloader",
                   # the train loader augments; the push loader holds the same images without augmentation
                   "train": "push_dataloader" if hasattr(datamodule, "push_dataloader") else "train_dataloader"}
        ds, masks = PairsAsItems(getattr(datamodule, loaders[split])().dataset), None
    n = len(ds) if limit is None else min(len(ds), int(limit))
    return Subset(ds, range(n)), masks
