"""Train one model: `python train.py model=protopnet datamodule=shapes trainer=ddp_cpu logger=csv ...`

Everything is built from conf/ (see README); the run folder gets the resolved config, metrics.json, checkpoints,
interpretation results and the W&B run's files. `python train.py resume=<run folder>` continues a run in its folder
with the overrides it was started with (pipeline/resume.py). A run that cannot go on prints one line (the full error
is in <run>/train.log); an interrupted one prints the command that resumes it (pipeline/run_errors.py).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

if __name__ == "__main__":
    # before the heavy imports, so that a wrong resume= is reported at once
    from pipeline.resume import expand_sys_argv
    expand_sys_argv()  # resume=<run folder> -> that run's overrides + ckpt_path + hydra.run.dir

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.run_errors import exit_cleanly  # noqa: E402
from pipeline.training import optimized_value, train  # noqa: E402
from pipeline.sweep_jobs import run_job  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # multirun: a DDP job runs in its own process, a failing job is recorded and the sweep goes on (sweep_jobs.py)
    with exit_cleanly(cfg):
        return run_job(cfg, train, optimized_value)


if __name__ == "__main__":
    main()
