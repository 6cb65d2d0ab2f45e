"""Train one model: `python train.py model=protopnet datamodule=shapes trainer=ddp_cpu logger=csv ...`

Everything is built from conf/ (see README); the run folder gets the resolved config, metrics.json, checkpoints,
interpretation results and the W&B run's files.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.training import optimized_value, train  # noqa: E402
from pipeline.sweep_jobs import run_job  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # multirun: a DDP job runs in its own process, a failing job is recorded and the sweep goes on (sweep_jobs.py)
    return run_job(cfg, train, optimized_value)


if __name__ == "__main__":
    main()
