"""ProtoPNet push speed: push time divided by the time of one plain forward pass over the same push set.

    python3 benchmarks/bench_push.py                       # resnet18, 200 prototypes, 300 images at 224 px
    python3 benchmarks/bench_push.py --image-size 112 --images 150 --threads 1

Prints two ratios: push with its files written (records JSON + gallery PNGs, what the callback writes after every
push) and push alone, each the median (and min-max) over interleaved rounds of its time / the forward pass of the
same round. Target: <= 1.2 with files. The public code is not installable from a registry: no ratio of it is quoted
(figures from another machine are not comparable).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algorithms.prototypes import PrototypeRecords  # noqa: E402
from algorithms.prototypes_render import render_gallery  # noqa: E402
from models.protopnet import ProtoPNet  # noqa: E402
from models.protopnet_push import push_prototypes  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=75)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 gives "
                    "steadier ratios on a shared machine")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ProtoPNet(num_classes=args.classes, channels=3, image_size=args.image_size, backbone=args.backbone,
                      prototypes_per_class=args.per_class).to(args.device).eval()
    x01 = torch.rand(args.images, 3, args.image_size, args.image_size)
    y = torch.arange(args.images) % args.classes
    x = (x01 - 0.5) / 0.25
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size], torch.arange(i, min(i + args.batch_size,
                                                                                          args.images)))
               for i in range(0, args.images, args.batch_size)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    @torch.no_grad()
    def forward():
        for bx, _, _ in batches:
            model(bx.to(args.device))
        sync()

    def push():
        result = push_prototypes(model, batches)
        sync()
        return result

    def push_with_files(out: Path):
        result = push()
        PrototypeRecords.build({}, result).save(out / "prototypes.json")
        sources = {int(i): x01[int(i)] for i in result.image_index[result.pushed].unique().tolist()}
        return render_gallery(result, sources, out)

    forward()  # warm-up (allocator, cudnn autotuning, first matplotlib import)
    with tempfile.TemporaryDirectory() as tmp:
        push_with_files(Path(tmp))
        # interleaved rounds: a shared machine's load hits all three alike; ratios per round, then the median
        rounds = []
        for _ in range(args.repeats):
            f = best_of(forward, 1)
            rounds.append((f, best_of(push, 1) / f, best_of(lambda: push_with_files(Path(tmp)), 1) / f))
        n_files = len(list(Path(tmp).iterdir()))
    m = model.num_prototypes
    print(f"device={args.device} backbone={args.backbone} prototypes={m} images={args.images} "
          f"image_size={args.image_size} threads={torch.get_num_threads()}")
    med = lambda i: statistics.median(r[i] for r in rounds)  # noqa: E731
    span = lambda i: f"{min(r[i] for r in rounds):.2f}-{max(r[i] for r in rounds):.2f}"  # noqa: E731
    print(f"forward pass:          {med(0):8.3f} s (median of {len(rounds)} rounds)")
    print(f"push (no files):       ratio {med(1):5.2f} (min-max {span(1)})")
    print(f"push + {n_files} files written: ratio {med(2):5.2f} (min-max {span(2)}; target <= 1.2)")

if __name__ == "__main__":
    main()
