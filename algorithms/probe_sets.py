"""Concept probe sets for network dissection: what a Broden-format probe set must offer, a real Broden folder opened
as one, and the first N items of a probe set with its concept attributes still visible.

    probe = open_broden("/data/broden1_224", split=None)        # or dm.probe_dataset("val")
    check_probe_dataset(probe)
    probe = probe_view(probe, 300)                             # the first 300 items
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from core.errors import ConfigError

PROBE_ATTRIBUTES = ("concept_names", "concept_categories", "category_names")
PROBE_KEYS = ("image", "seg", "image_labels")
BRODEN_FILES = ("index.csv", "label.csv", "category.csv", "images")


class DissectionError(ConfigError):
    """Bad input to network dissection (layer, probe set); the message names the option and the fix."""


def check_probe_dataset(probe: Dataset, option: str = "probe") -> None:
    """A probe set must describe its concepts and yield Broden items (see datamodules/broden.py)."""
    missing = [a for a in PROBE_ATTRIBUTES if not hasattr(probe, a)]
    if missing:
        raise DissectionError(f"{option}: {type(probe).__name__} is not a Broden-format probe set; it lacks "
                              f"{', '.join(missing)} (a datamodules.broden.BrodenDataset has them)")
    if len(probe) == 0:
        raise DissectionError(f"{option}: the probe set is empty")
    item = probe[0]
    if not isinstance(item, dict) or any(k not in item for k in PROBE_KEYS):
        have = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise DissectionError(f"{option}: probe items must be dicts with {', '.join(PROBE_KEYS)}; got {have}")


def open_broden(path, split: str | None = "val", image_size=None, mean=None, std=None, limit: int | None = None,
                option: str = "callbacks.dissection.probe"):
    """A real Broden folder (e.g. broden1_224) as a probe set; a folder that is not Broden-format raises an error
    that says which of index.csv, label.csv, category.csv, images/ is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DissectionError(f"{option}={str(path)!r}: no such folder; give a Broden folder "
                              f"(index.csv, label.csv, category.csv, images/) or leave probe=null to use the "
                              f"datamodule's probe set")
    missing = [n for n in BRODEN_FILES if not (root / n).exists()]
    if missing:
        raise DissectionError(f"{option}={str(path)!r} is not a Broden folder: {', '.join(missing)} missing (a "
                              f"Broden folder holds index.csv, label.csv, category.csv and images/; NetDissect's "
                              f"script/dlbroden.sh downloads broden1_224)")
    from datamodules.broden import BrodenDataset
    kwargs = {}
    if mean is not None and std is not None:
        kwargs.update(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    return BrodenDataset(root, split=split, image_size=image_size, limit=limit, cache=True, **kwargs)


class ProbeView(Subset):
    """Some items of a probe set that keeps its concept attributes visible (a plain Subset hides them)."""

    def __getattr__(self, name):
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def probe_view(probe: Dataset, size: int | None) -> Dataset:
    """The first `size` items of `probe` (all of them for None or a larger size)."""
    if size is None or len(probe) <= size:
        return probe
    return ProbeView(probe, range(size))


def base_dataset(dataset):
    """The dataset under any Subsets (a rank's shard, a ProbeView): where the concept attributes live."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset
