"""ProtoPNet push on the default run's data path: push time / one plain forward pass over the same push loader, all
timed interleaved in one run (median and min-max of the per-round ratios). Target <= 1.2 with files.

The model, data and callback are the default run's (`python train.py`: ProtoPNet on shapes, the datamodule's
push_dataloader, the prototype callback of conf/model/protopnet.yaml); the cost of a push does not depend on
training, so the model is the seeded untrained one. Three candidates:
- push: the projection alone (models/protopnet_push.push_prototypes);
- push + files: and every file a push's callback writes, through callbacks.prototypes.PrototypeCallback.run itself
  (prototypes.json, gallery pages, "this looks like that" panels, quality.json with its purity and hit-rate metrics
  over the probe masks and the evidence share over the validation images);
- push + figures: the push and the callback's render step only (records, gallery, panels; no quality metrics).
The public code is not installable from a registry: no ratio of it is quoted; the floor is the forward pass.

    python3 benchmarks/bench_push.py [--images 0 (all)] [--repeats 3] [--threads 1] [hydra overrides]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from common import compose, interleaved, result  # also puts the repository root on sys.path

import hydra  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=0, help="the first N images of the push set (0: all of it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared machine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*", help="hydra overrides (default: the default run, ProtoPNet on shapes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from models.protopnet_push import push_prototypes

    cfg = compose(args.overrides)
    torch.manual_seed(0)
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.prepare_data()
    dm.setup("fit")
    model = hydra.utils.instantiate(cfg.model).to(args.device).eval()
    callback = hydra.utils.instantiate(cfg.callbacks.prototypes)
    full = dm.push_dataloader(batch_size=model.push_batch_size)
    n = len(full.dataset) if args.images <= 0 else min(args.images, len(full.dataset))
    loader = DataLoader(Subset(full.dataset, range(n)), batch_size=full.batch_size, num_workers=full.num_workers)
    class_names = list(getattr(dm, "class_names", None) or [])

    @torch.no_grad()
    def forward():
        for x, _, _ in loader:
            model(x.to(args.device))

    def push():
        res = push_prototypes(model, loader)
        # what ProtoPNet.push records for its callback (the prototypes themselves are left as they were, so that
        # every round pushes the same model)
        model.last_push = res
        model.push_history.append({"epoch": 0, **res.summary()})
        return res

    with tempfile.TemporaryDirectory() as tmp:
        trainer = SimpleNamespace(datamodule=dm, default_root_dir=tmp, loggers=[], callbacks=[callback],
                                  current_epoch=0, global_step=0)

        def push_and_callback():
            push()
            callback.run(trainer, model, 0)

        def push_and_figures():
            res = push()
            callback.render(trainer, model, dm, res, callback.epoch_dir(trainer, 0), class_names)

        base, ratios = interleaved(forward, {"push": push, "push+files": push_and_callback,
                                             "push+figures": push_and_figures}, args.repeats)
        files = sorted(p.name for p in callback.epoch_dir(trainer, 0).iterdir())
    print(f"{type(model).__name__} ({cfg.model.backbone}, {model.num_prototypes} prototypes) on "
          f"{type(dm).__name__}: push set {n} images at {model.image_size} px, batch {full.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.device}")
    print(f"  forward pass over the push loader: median {base.median:.2f} s")
    print(f"  push alone / forward:              {ratios['push']}")
    print(f"  push + figures / forward:          {ratios['push+figures']}")
    print(f"  push + callback, all files / fwd:  {ratios['push+files']}   (target <= 1.2)")
    print(f"  {len(files)} files written per push: {', '.join(files)}")
    result("push", ratios["push+files"], "forward pass over the push loader", push_only=ratios["push"].median,
           push_figures=ratios["push+figures"].median, files=len(files), images=n, forward_s=base.median)


if __name__ == "__main__":
    main()
