"""Shared by the benchmark scripts: compose the project's config like train.py does, and time things."""
from __future__ import annotations

import os
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


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeat` calls after `warmup` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


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


def timed_ratios(baseline, candidates: dict, repeats: int) -> tuple[float, dict]:
    """Median baseline time and, per candidate, the median of (candidate / baseline) over interleaved rounds, so that
    load from other processes on a shared machine hits both sides of each ratio alike."""
    import statistics
    baseline()
    for fn in candidates.values():
        fn()  # warm-up (allocator, kernels, lazy imports)
    base, ratios = [], {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            b = synced_time(baseline)
            ratios[name].append(synced_time(fn) / b)
            base.append(b)
    return statistics.median(base), {k: statistics.median(v) for k, v in ratios.items()}


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
