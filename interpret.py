"""Interpret a finished model without training it: the interpretation callbacks of the config run once.

    python interpret.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt             # a trained run
    python interpret.py model=cnn model.backbone=resnet18 model.pretrained=imagenet datamodule=imagefolder ...
    python interpret.py experiment=netdissect_resnet18_broden                                 # a paper recipe

The same config tree as train.py (conf/interpret.yaml includes conf/train.yaml), so every group and override works
the same; `trainer=ddp_cpu` / `trainer=ddp` shard the methods across ranks. The run folder (outputs/interpret/runs/...)
holds what a training run's holds: metrics.json, interp/, W&B files, report.html (pipeline/interpreting.py).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.interpreting import interpret  # noqa: E402
from pipeline.run_errors import exit_cleanly  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="interpret")
def main(cfg: DictConfig) -> None:
    with exit_cleanly(cfg):
        interpret(cfg)


if __name__ == "__main__":
    main()
