"""Checkpoints are written to a temporary file and renamed, so a run killed at any moment never leaves a truncated
`last.ckpt`: the file on disk is either the previous complete checkpoint or the new complete one. A temporary file
left by a kill is removed when the run restarts (pipeline/checkpoints.py: remove_stale_temp_files)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO


def disk_full_error(path: Path, err: BaseException) -> OSError:
    """'No space left on device' first, then the path and what was kept: torch reports a full disk as
    "[enforce fail at inline_container.cc] unexpected pos" with the real cause buried in the traceback."""
    try:
        free = shutil.disk_usage(path.parent).free
        where = f" ({free / 2**20:.1f} MiB free there)"
    except OSError:
        where = ""
    return OSError(errno.ENOSPC, f"No space left on device: writing the checkpoint {path} failed{where}; the previous "
                                 f"{path.name} (if any) is kept. Free disk space, or put the run folder on a larger "
                                 f"disk (hydra.run.dir=... or paths.log_dir=...), then resume the run")


def is_disk_full(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "unexpected pos" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        if path.parent.exists() and not path.parent.is_dir():
            raise NotADirectoryError(f"{path.parent} is a file, so the checkpoint {path.name} cannot be written "
                                     f"there; move the file away or choose another run folder (hydra.run.dir=...)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, Exception) and is_disk_full(err):
                raise disk_full_error(path, err) from err
            raise

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None):
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"ckpt_path={path} is a folder; pass the checkpoint file, e.g. "
                                    f"{path / 'last.ckpt'} (or resume=<run folder>)")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt_path=<run>/checkpoints/last.ckpt "
                                    f"or resume=<run folder>")
        try:
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=False, **kwargs)
        except (RuntimeError, EOFError, OSError) as err:
            raise RuntimeError(f"checkpoint {path} is unreadable or truncated ({err}); "
                               f"resume from another file in {path.parent}") from err
