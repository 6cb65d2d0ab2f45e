"""Shared by the benchmark scripts: compose the project's config like train.py does, and time things."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str] | None = None, output_dir: str | Path | None = None):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides or []))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or ROOT / "outputs" / "bench")
    return cfg


def synced_time(fn) -> float:
    """Wall time of one call, with the GPU (if any) synchronised before and after."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


class Spread(list):
    """Measurements of one quantity over interleaved rounds: the median and the min-max spread."""

    @property
    def median(self) -> float:
        return statistics.median(self)

    @property
    def spread(self) -> str:
        return f"{min(self):.3g}-{max(self):.3g}"

    def __str__(self) -> str:
        return f"{self.median:.3g} (min-max {self.spread}, {len(self)} rounds)"


def interleaved(baseline, candidates: dict, repeats: int) -> tuple[Spread, dict[str, Spread]]:
    """Baseline seconds and, per candidate, its time / the baseline time measured right before it, over `repeats`
    rounds (baseline, candidate, baseline, next candidate, ...), so that load from other processes on a shared
    machine hits both sides of each ratio alike. One untimed call of each first (allocator, kernels, lazy imports)."""
    baseline()
    for fn in candidates.values():
        fn()
    base, ratios = Spread(), {k: Spread() for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            b = synced_time(baseline)
            ratios[name].append(synced_time(fn) / b)
            base.append(b)
    return base, ratios


def timed_ratios(baseline, candidates: dict, repeats: int) -> tuple[float, dict]:
    """`interleaved`, reduced to the median baseline time and the median ratio of each candidate."""
    base, ratios = interleaved(baseline, candidates, repeats)
    return base.median, {k: v.median for k, v in ratios.items()}


def result(name: str, ratio: Spread, vs: str, **figures) -> str:
    """Print (and return) the one line `benchmarks/run_all.py` collects: `RESULT <name> ratio=<median>
    spread=<min>-<max> vs=<what the ratio divides by> key=value ... load=<1-minute load average>`."""
    def text(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v).replace(" ", "_")
    fields = {"ratio": ratio.median, "spread": ratio.spread, "vs": vs, **figures,
              "load": round(os.getloadavg()[0], 1)}
    line = f"RESULT {name} " + " ".join(f"{k}={text(v)}" for k, v in fields.items())
    print(line, flush=True)
    return line


def imagenet_model_and_batch(backbone: str, size: int, batch: int, threads: int | None = None):
    """(model, random batch, device) for the ImageNet-sized settings the public tools were timed in: a torchvision
    backbone with 1000 classes in eval mode, seed 0; `threads` fixes torch's CPU threads (1: stable ratios on a
    shared machine)."""
    import torch

    from models.cnn import CNNClassifier
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = CNNClassifier(num_classes=1000, image_size=size, backbone=backbone).to(device).eval()
    return model, torch.randn(batch, 3, size, size, device=device), device
