"""What a run folder holds, read for the report: metrics.json, the resolved config, and the latest typed result of
each interpretation callback (through its class, never by guessing JSON keys)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.report.history import epoch_dirs

log = logging.getLogger(__name__)


@dataclass
class RunFolder:
    path: Path
    problems: list[str] = field(default_factory=list)   # what could not be read, shown on the page

    @cached_property
    def payload(self) -> dict[str, Any]:
        """metrics.json; {} for a run that died before writing it."""
        try:
            data = json.loads((self.path / "metrics.json").read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            self.problems.append("no metrics.json: the run died before writing it, or is still running")
        except (OSError, ValueError) as err:
            self.problems.append(f"metrics.json unreadable ({err})")
        return {}

    @property
    def status(self) -> str:
        status = str(self.payload.get("status", "unknown" if self.payload else "missing"))
        error = str(self.payload.get("error") or "")
        # Ctrl-C: Lightning's graceful shutdown turns the KeyboardInterrupt into SystemExit(1)
        if status == "failed" and error.startswith(("KeyboardInterrupt", "SystemExit")):
            return "interrupted"
        return status

    @property
    def metrics(self) -> dict[str, Any]:
        m = self.payload.get("metrics")
        return m if isinstance(m, dict) else {}

    @cached_property
    def config(self):
        """The resolved config (config.yaml, else Hydra's .hydra/config.yaml), or None."""
        from omegaconf import OmegaConf
        for file in (self.path / "config.yaml", self.path / ".hydra" / "config.yaml"):
            if file.is_file():
                try:
                    return OmegaConf.load(file)
                except Exception as err:  # noqa: BLE001 - shown on the page, the rest still renders
                    self.problems.append(f"{file.name} unreadable ({err})")
        return None

    def select(self, key: str, default=None):
        from omegaconf import OmegaConf
        if self.config is None:
            return default
        try:
            value = OmegaConf.select(self.config, key, default=default)
        except Exception:  # noqa: BLE001 - interpolations that cannot resolve outside the run
            return default
        return value

    def callbacks(self) -> list[str]:
        """Names of the interp/<callback>/ folders, in a stable order."""
        root = self.path / "interp"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def latest_dir(self, callback: str, holding: str | None = None) -> tuple[int, Path] | None:
        """The newest epoch folder of a callback (that holds the file or glob `holding`)."""
        for epoch, folder in reversed(epoch_dirs(self.path / "interp" / callback)):
            if holding is None or any(folder.glob(holding)):
                return epoch, folder
        return None

    def latest(self, callback: str, filename: str, cls):
        """(epoch, result) of the newest `interp/<callback>/epoch_NNN/<filename>` read as `cls`, or None."""
        from core.results import SchemaError
        found = self.latest_dir(callback, filename)
        if found is None:
            return None
        epoch, folder = found
        try:
            return epoch, cls.load(folder / filename)
        except SchemaError as err:
            self.problems.append(str(err))
            log.warning("report: %s", err)
            return None

    def rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()
