"""Network dissection on the real data path: dissection wall time / one plain forward pass over the same probe images
from the same loader, both interleaved in one run (median and min-max of the per-round ratio). Target <= 1.5.

The probe set is a Broden-format folder written to a temporary folder (datamodules/broden.py's writer: JPEG images,
half-size label maps for color / object / material / part (two maps), image-level texture and scene labels, 50
concepts), read by BrodenDataset with its cache off, so that both sides decode every image and mask from disk in
every round. resnet18 layer4, 200 images at 224 px, 112x112 masks by default. NetDissect-Lite is not installable
from a registry: the comparison is with the floor measured in the same run, the forward pass it cannot avoid.
What the callbacks cost a whole training run is bench_callback_overhead.py's measurement.

    python benchmarks/bench_dissection.py [--images 200] [--size 224] [--repeats 3] [--threads 1] [--cache]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import interleaved, result

import numpy as np
import torch
from torch.utils.data import DataLoader

#: 50 concepts over Broden's categories; pixel categories get label maps, texture and scene image-level labels
CONCEPTS_PER_CATEGORY = {"color": 10, "object": 14, "material": 6, "part": 10, "texture": 5, "scene": 5}
PIXEL_MAPS = ("color", "object", "material", "part", "part")


def smooth_noise(rng: np.random.Generator, size: int, coarse: int) -> np.ndarray:
    """A low-frequency random field [size, size] in [0, 1): photos compress and decode like this, not like noise."""
    field = torch.from_numpy(rng.random((1, 1, coarse, coarse), dtype=np.float32))
    return torch.nn.functional.interpolate(field, size=(size, size), mode="bilinear")[0, 0].numpy()


def write_probe_folder(root: Path, n: int, size: int, seed: int = 0) -> int:
    """A Broden folder of n images; returns the number of concepts."""
    from datamodules.broden import Concept, write_broden
    concepts, ids, first = [], {}, 1
    for category, count in CONCEPTS_PER_CATEGORY.items():
        concepts += [Concept(f"{category}{k}", category) for k in range(count)]
        ids[category] = np.arange(first, first + count)
        first += count
    rng = np.random.default_rng(seed)
    seg = size // 2  # real Broden (broden1_224) stores masks at half the image size
    records = []
    for i in range(n):
        pixels = np.stack([smooth_noise(rng, size, 16) for _ in range(3)], -1)
        maps: dict[str, list[np.ndarray]] = {}
        for category in PIXEL_MAPS:
            blobs = np.floor(smooth_noise(rng, seg, 8) * (len(ids[category]) + 2)).astype(np.int64) - 2
            maps.setdefault(category, []).append(np.where(blobs >= 0, ids[category][blobs.clip(0)], 0))
        labels = {c: [int(rng.choice(ids[c]))] for c in ("texture", "scene")}
        records.append({"image": f"probe/{i:05d}.jpg", "split": "val", "pixels": (pixels * 255).astype(np.uint8),
                        "seg": maps, "labels": labels})
    write_broden(root, records, concepts)
    return len(concepts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layer", default="backbone.layer4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared "
                        "machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", action="store_true", help="keep decoded items in memory after the first read "
                        "(what the callback's probe set does from its second epoch on)")
    args = parser.parse_args()
    from algorithms.dissection import dissect
    from datamodules.broden import BrodenDataset
    from models.cnn import CNNClassifier
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CNNClassifier(num_classes=10, channels=3, image_size=args.size, backbone=args.backbone)
    model = model.to(args.device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        num_concepts = write_probe_folder(Path(tmp), args.images, args.size)
        probe = BrodenDataset(tmp, split="val", cache=args.cache)
        loader = DataLoader(probe, batch_size=args.batch_size)

        @torch.no_grad()
        def forward():
            for batch in loader:
                model(batch["image"].to(args.device))

        def dissection():
            dissect(model, [args.layer], loader)

        base, ratios = interleaved(forward, {"dissection": dissection}, args.repeats)
        res = dissect(model, [args.layer], loader)[args.layer]
    r = ratios["dissection"]
    print(f"{args.backbone} {args.layer}, {args.images} images {args.size} px decoded from a Broden folder "
          f"(cache {'on' if args.cache else 'off'}), masks {probe.seg_size[0]}x{probe.seg_size[1]}, {res.num_units} "
          f"units, {num_concepts} concepts, {torch.get_num_threads()} threads, {args.device}")
    print(f"  forward pass over the loader: median {base.median:.2f} s")
    print(f"  dissection / forward pass: {r}   (target <= 1.5)")
    result("dissection", r, "forward pass over the same loader", forward_s=base.median, images=args.images,
           concepts=num_concepts)


if __name__ == "__main__":
    main()
