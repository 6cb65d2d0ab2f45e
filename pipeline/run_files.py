"""Files every run folder holds besides checkpoints: the resolved config and metrics.json."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch


def to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        f = to_float(v)
        if f is not None:
            out[k] = f if math.isfinite(f) else None
    return out


def write_metrics_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
