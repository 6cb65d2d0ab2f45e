"""How the decision tree's cost grows with the number of images, and what the incremental merge loop saves.

For n images of one class (D units), algorithms/decision_tree/build.py builds the pair-loss matrix once (O(n^2 D))
and updates one row per merge (O(n D)), so the whole build should grow about 4x per doubling of n (quadratic), and
the naive loop (every merge recomputes the losses of all live pairs, O(n^3 D)) about 8x. Both are timed side by side
in interleaved rounds (median and spread of the ratios, so that load from other processes hits both alike); the
naive loop must give the same merges. Run: `python3 benchmarks/bench_decision_tree.py [--n 64] [--units 128]`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from algorithms.decision_tree.build import agglomerate, mode_fit, unit_rationales  # noqa: E402
from benchmarks.common import Spread, result, synced_time  # noqa: E402


def naive(u: torch.Tensor, sparsity: float) -> list[float]:
    """Reference: every merge recomputes the loss of every live pair (the textbook agglomerative loop)."""
    sums, counts = [r.clone() for r in u], [1.0] * len(u)
    losses = []
    while len(sums) > 1:
        s, n = torch.stack(sums), torch.tensor(counts)
        f = mode_fit(s, n, sparsity)
        pair = f[:, None] + f[None] - mode_fit(s[:, None] + s[None], n[:, None] + n[None], sparsity)
        pair.fill_diagonal_(float("inf"))
        k = int(pair.argmin())
        i, j = divmod(k, len(sums))
        losses.append(float(pair[i, j]))
        i, j = min(i, j), max(i, j)
        sums[i], counts[i] = sums[i] + sums[j], counts[i] + counts[j]
        del sums[j], counts[j]
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64, help="images of the smallest size (then 2n, 4n)")
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sizes = [args.n, 2 * args.n, 4 * args.n]
    data = {n: unit_rationales(torch.randn(n, args.units, generator=g).relu()) for n in sizes}
    ref = naive(data[args.n], args.sparsity)
    got = agglomerate(data[args.n], args.sparsity).loss.tolist()
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, "the incremental loop must make the naive loop's merges"
    times: dict[str, list[float]] = {f"incremental n={n}": [] for n in sizes}
    times.update({f"naive n={n}": [] for n in sizes[:2]})
    for _ in range(args.repeats):
        for n in sizes:
            times[f"incremental n={n}"].append(synced_time(lambda: agglomerate(data[n], args.sparsity)))
        for n in sizes[:2]:
            times[f"naive n={n}"].append(synced_time(lambda: naive(data[n], args.sparsity)))
    base = times[f"incremental n={args.n}"]
    print(f"D={args.units} units, sparsity {args.sparsity}, {args.repeats} interleaved rounds, one thread")
    for name, ts in times.items():
        ratios = Spread(t / b for t, b in zip(ts, base))
        print(f"{name:>20}: median {Spread(ts).median * 1e3:8.1f} ms   x{ratios.median:6.2f} of incremental "
              f"n={args.n} (spread {ratios.spread})")
    versus = {}
    for n in sizes[:2]:
        versus[n] = Spread(a / b for a, b in zip(times[f"incremental n={n}"], times[f"naive n={n}"]))
        print(f"incremental / naive at n={n}: {versus[n]}")
    growth = {f"growth_{k}n": Spread(t / b for t, b in zip(times[f"incremental n={k * args.n}"], base)).median
              for k in (2, 4)}
    result("decision_tree", versus[sizes[1]], "naive merge loop on the same images", n=sizes[1],
           **{f"ratio_n{sizes[0]}": versus[sizes[0]].median}, **growth)

if __name__ == "__main__":
    main()
