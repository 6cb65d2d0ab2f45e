"""How a run that cannot go on ends: one clear line on the console, the full error in <run>/train.log, an exit code.

- A setting, data or checkpoint problem (ConfigError, DataError, a missing file, a full disk) prints its message,
  which names the option or path and the fix; the traceback goes to train.log only.
- Any other error prints `<Type>: <message>` and where the traceback is; HYDRA_FULL_ERROR=1 also prints it on the
  console.
- An interruption (SIGINT/SIGTERM) exits with 128 + the signal number after train() printed the resume command.
A failed run thus always keeps its full error in train.log (Hydra's log file), not only on the console.

RunDirCheck (a Hydra callback, conf/hydra/default.yaml) refuses a run or sweep folder that is, or lies below, a
file before Hydra tries to create it (which would end in a bare NotADirectoryError or "File exists" traceback).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from pipeline.interrupts import RunInterrupted

log = logging.getLogger("train")

# errors whose message is the whole story (it names the option or path and the fix)
EXPLAINED = ("ConfigError", "DataError", "ResumeError", "NonFiniteLossError", "CapabilityError")


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_log_file_only(level: int, text: str) -> None:
    """A record for train.log only (the console gets the one-line version)."""
    record = logging.LogRecord("train", level, __file__, 0, text, None, None)
    for handler in _file_handlers():
        if record.levelno >= handler.level:
            handler.handle(record)


def one_line(err: BaseException) -> str:
    name = type(err).__name__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        text = err.strerror if err.strerror and err.strerror.startswith("No space") else str(err)
        return text if text.startswith("No space left on device") else f"No space left on device: {text}"
    if name in EXPLAINED or isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                             PermissionError)):
        return str(err)
    return f"{name}: {err}"


def log_path(cfg: DictConfig | None) -> str:
    handlers = _file_handlers()
    if handlers:
        return handlers[0].baseFilename
    try:
        return str(Path(cfg.paths.output_dir) / f"{cfg.get('task_name', 'train')}.log")
    except Exception:  # noqa: BLE001
        return "the run folder's train.log"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


@contextlib.contextmanager
def exit_cleanly(cfg: DictConfig | None) -> Iterator[None]:
    """train.py's task function body runs inside this."""
    try:
        yield
    except RunInterrupted as err:
        # train() printed what happened and the resume command. DDP children exit 0: Lightning's launcher kills
        # every process (the one writing metrics.json included) as soon as one child exits nonzero
        raise SystemExit(err.exit_code if is_rank_zero() else 0) from None
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001
        to_log_file_only(logging.ERROR, "".join(traceback.format_exception(err)))
        if not is_rank_zero():
            raise SystemExit(1) from None
        message = one_line(err)
        where = log_path(cfg)
        if isinstance(err, KeyboardInterrupt):
            message = "interrupted (KeyboardInterrupt)"
        log.error("%s", message)
        hint = f"(full traceback in {where})"
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exception(err, file=sys.stderr)
        elif type(err).__name__ not in EXPLAINED:
            hint = f"(full traceback in {where}; HYDRA_FULL_ERROR=1 prints it here)"
        print(hint, file=sys.stderr)
        raise SystemExit(130 if isinstance(err, KeyboardInterrupt) else 1) from None


# ----- the run folder, before Hydra creates it ------------------------------------------------------------------------
def file_in_the_way(folder: Path) -> Path | None:
    for parent in (folder, *folder.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class RunDirCheck(_HydraCallback):
    """Refuse a run/sweep folder that is (or lies below) a file, with the option to change."""

    def _check(self, folder: Any, key: str) -> None:
        path = Path(str(folder)).expanduser()
        blocker = file_in_the_way(path)
        if blocker is not None:
            what = "is a file" if blocker == path else f"lies below {blocker}, which is a file"
            print(f"train.py: error: the run folder {path} {what}; move the file away or choose another folder "
                  f"({key}=<folder>, or paths.log_dir=<folder>)", file=sys.stderr)
            raise SystemExit(1)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
