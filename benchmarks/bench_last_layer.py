"""ProtoPNet's last-layer phase: the convex solve (one similarity pass over the training images + FISTA,
models/protopnet_last_layer.py) versus the public code's epochs (Adam on mini-batches of images, a forward pass
through the frozen network for every batch of every epoch), on the same frozen model and images.

Prints, over interleaved rounds (median, with min-max spread): the wall time of each, their ratio, and the objective
F = mean CE + l1 |off-class W| + l2/2 ||W||^2 each reaches on the training similarities, with the convex KKT residual
(0 at the optimum). The objective is the convex one (l1, l2 of model.last_layer_fit); the epochs variant minimises
the public code's CE + coefs.l1 |off-class W| with Adam, so its F is what it reaches on the same yardstick.

    python benchmarks/bench_last_layer.py --images 1200 --epochs 20 --rounds 3 --threads 1
"""
from __future__ import annotations

import argparse
import time

from common import Spread, result  # also puts the project root on sys.path

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20, help="last-layer epochs of the public code (20)")
    ap.add_argument("--lr", type=float, default=1e-4, help="the public code's last-layer learning rate")
    ap.add_argument("--batch", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.protopnet import ProtoPNet
    from models.protopnet_last_layer import (fit_last_layer, last_layer_objective, off_class_mask,
                                             training_similarities)

    torch.manual_seed(0)
    model = ProtoPNet(num_classes=args.classes, image_size=args.size).eval()
    # class-dependent images, so that the similarities carry the class (a random frozen network still separates them)
    y = torch.arange(args.images) % args.classes
    x = 0.3 * torch.randn(args.images, 3, args.size, args.size) + (y.float() / args.classes)[:, None, None, None]
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.images, args.batch)]
    cfg = model.last_layer_fit
    off = off_class_mask(model.prototype_class_identity)
    w0 = model.last_layer.weight.detach().clone()

    def convex():
        sims, labels = training_similarities(model, batches)
        return fit_last_layer(sims, labels, off, cfg.l1, cfg.l2, weight0=w0, max_iter=cfg.max_iter, tol=cfg.tol)

    def epochs():
        layer = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w0)
        opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
        for _ in range(args.epochs):
            for i in torch.randperm(len(batches)).tolist():
                xb, yb = batches[i]
                with torch.no_grad():
                    sim = model.prototype_outputs(xb).similarities
                loss = F.cross_entropy(layer(sim), yb) + model.coefs["l1"] * (layer.weight * off).abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return layer.weight.detach()

    times = {"convex": Spread(), "epochs": Spread()}
    fits, weights = [], []
    for _ in range(args.rounds):  # interleaved, so that load from other processes hits both alike
        t = time.perf_counter()
        fits.append(convex())
        times["convex"].append(time.perf_counter() - t)
        t = time.perf_counter()
        weights.append(epochs())
        times["epochs"].append(time.perf_counter() - t)
    sims, labels = training_similarities(model, batches)
    f_epochs = float(last_layer_objective(weights[-1].double(), sims.double(), labels, off.double(), cfg.l1,
                                          cfg.l2)[0])
    fit = fits[-1]
    ratios = Spread(c / e for c, e in zip(times["convex"], times["epochs"]))
    print(f"{args.images} images, {args.classes} classes, {model.num_prototypes} prototypes, {args.size} px, "
          f"threads {torch.get_num_threads()}, {args.rounds} interleaved rounds")
    for name, ts in times.items():
        print(f"  {name:7s} median {ts.median:7.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})")
    print(f"  convex / epochs time: {ratios}")
    print(f"  objective F: start {fit.initial_objective:.5f}, convex {fit.objective:.5f} (KKT residual "
          f"{fit.kkt_residual:.1e}, {fit.iterations} iterations), {args.epochs} Adam epochs {f_epochs:.5f}")
    result("last_layer", ratios, f"{args.epochs} last-layer epochs of the public code", convex_F=fit.objective,
           epochs_F=f_epochs, images=args.images)

if __name__ == "__main__":
    main()
