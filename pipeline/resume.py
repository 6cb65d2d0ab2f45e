"""`python train.py resume=<run folder>`: continue a run in its own folder with the settings it was started with.

train.py expands the command line before Hydra reads it: the run's recorded overrides (<run>/.hydra/overrides.yaml),
then the extra overrides given with resume= (only those that change neither the model nor the data, see ALLOWED),
then `ckpt_path=<run>/checkpoints/last.ckpt` (when the run got that far), `hydra.run.dir=<run>` and `resume=<run>`.
So the user never retypes the overrides, and the run continues in the same folder: the same last.ckpt, metrics.csv,
W&B run and metrics.json (whose "attempts" lists every earlier start). `ckpt_path=` still works as before, e.g. to
start a new run (a new folder) from another run's checkpoint.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from core.errors import ConfigError

# the DDP children that Lightning starts re-run this command line, already expanded: they must not expand it again
EXPANDED_ENV = "INTERP_RESUME_EXPANDED"
# overrides that may be added or changed on resume: they change how the run continues (length, hardware, logging,
# the interpretation callbacks, where the data lies), never what model is trained on which data
ALLOWED = ("trainer", "logger", "callbacks", "test", "tags", "optimized_metric", "continue_on_failure",
           "datamodule.data_dir", "datamodule.num_workers", "datamodule.pin_memory", "paths.data_dir", "hydra")
# settings the expansion writes itself
OWN = ("resume", "ckpt_path")
CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


class ResumeError(ConfigError):
    """resume=<folder> cannot work; the message says why and what to run instead."""


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") or key.startswith(a + "/") for a in ALLOWED)


def quote(value: str) -> str:
    # Hydra's override grammar: a quoted string keeps '=', ',', spaces and ':' of a path literal
    return f"'{value}'" if '"' in value else f'"{value}"'


def resume_command(run_dir: str | Path) -> str:
    return f"python train.py resume={shlex.quote(str(run_dir))}"


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def expand(argv: list[str]) -> list[str]:
    """The command line (without the program name) with resume=<folder> expanded; unchanged without resume=."""
    resumes = [a for a in argv if override_key(a) == "resume" and "=" in a]
    if not resumes or os.environ.get(EXPANDED_ENV):
        return argv
    if len(resumes) > 1:
        raise ResumeError(f"resume= is given {len(resumes)} times; give one run folder")
    value = resumes[0].split("=", 1)[1].strip().strip("'\"")
    if any(a in ("-m", "--multirun") for a in argv):
        raise ResumeError("resume= continues one run; it cannot be combined with -m (resume each job folder of "
                          "the sweep on its own: python train.py resume=<sweep>/<job number>)")
    if not value or value.lower() == "null":
        return [a for a in argv if a not in resumes]
    folder = Path(value).expanduser().resolve()
    if not folder.exists():
        raise ResumeError(f"resume={value}: {folder} does not exist; pass a run folder such as "
                          f"outputs/train/runs/<date>_<time>")
    if not folder.is_dir():
        raise ResumeError(f"resume={value}: {folder} is a file; pass the run folder that holds it")
    recorded_file = folder / ".hydra" / "overrides.yaml"
    if not recorded_file.is_file():
        raise ResumeError(f"resume={value}: {folder} is not a run folder of train.py ({recorded_file} is missing); "
                          f"to continue from a checkpoint in a new run folder use ckpt_path=<file>")
    from omegaconf import OmegaConf
    recorded = [str(o) for o in OmegaConf.load(recorded_file) if override_key(str(o)) not in OWN]

    flags, extra, i = [], [], 0
    rest = [a for a in argv if a not in resumes]
    while i < len(rest):
        arg = rest[i]
        if arg.split("=", 1)[0] in CONFIG_FLAGS:
            flags.append(arg)
            if "=" not in arg and i + 1 < len(rest):
                flags.append(rest[i + 1])
                i += 1
        elif arg.startswith("-"):
            flags.append(arg)
        else:
            extra.append(arg)
        i += 1
    if any(override_key(o) == "ckpt_path" for o in extra):
        raise ResumeError("resume= sets ckpt_path itself (<run>/checkpoints/last.ckpt); give either "
                          "resume=<run folder> or ckpt_path=<file>, not both")
    refused = [o for o in extra if not allowed(override_key(o))]
    if refused:
        raise ResumeError(f"resume={value} continues the run with the model and data it was started with; "
                          f"{' '.join(refused)} would change them. Only trainer.*, logger, callbacks.*, test, tags "
                          f"and where the data lies (datamodule.data_dir, paths.data_dir, datamodule.num_workers) may "
                          f"change on resume. For other settings start a new run (optionally from this run's weights: "
                          f"ckpt_path={last_checkpoint(folder)})")
    changed = {override_key(o) for o in extra}
    merged = [o for o in recorded if override_key(o) not in changed] + extra
    ckpt = last_checkpoint(folder)
    expanded = flags + merged
    if ckpt.is_file():
        expanded.append(f"ckpt_path={quote(str(ckpt))}")
    expanded += [f"resume={quote(str(folder))}", f"hydra.run.dir={quote(str(folder))}", "hydra.mode=RUN"]
    os.environ[EXPANDED_ENV] = str(folder)
    return expanded


def expand_sys_argv() -> None:
    """train.py, before Hydra parses sys.argv: expand resume= or exit with a one-line error."""
    try:
        sys.argv[1:] = expand(sys.argv[1:])
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
