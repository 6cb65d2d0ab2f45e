"""WandbLogger that never fails nor stalls a run: any W&B error at init or while logging switches to offline.

pipeline/wandb_setup.py decides online/offline before the run starts (a bounded check of the server and the key).
What can still go wrong afterwards (wandb.init raising or timing out, a logging call raising because the server or
W&B's service process went away) is caught here: the run is re-opened offline under the same run id (so `wandb sync`
later appends to the same W&B run), ONE warning line says why and how to upload, and training goes on. If even the
offline run cannot be opened, W&B logging is switched off for the rest of the run (one more line).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger

from pipeline.wandb_setup import sync_hint

log = logging.getLogger(__name__)

GUARDED = ("log_metrics", "log_hyperparams", "log_table", "log_text", "log_image", "log_audio", "log_video",
           "after_save_checkpoint", "finalize")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


class FallbackWandbLogger(WandbLogger):
    """conf/logger/wandb.yaml's logger; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # wandb 0.31 warns about the (deprecated) setting whenever it is passed, even as None
            self._wandb_init.pop("anonymous", None)
        self.fallback_reason: str | None = None
        self.disabled_reason: str | None = None

    @property
    def experiment(self):
        if self.disabled_reason is not None:
            from pytorch_lightning.loggers.logger import DummyExperiment
            return DummyExperiment()
        try:
            return super().experiment
        except Exception as err:  # noqa: BLE001 - W&B never aborts a run
            if not self._switch_offline(f"wandb.init failed ({_first_line(err)})"):
                raise
        try:
            return super().experiment
        except Exception as err:  # noqa: BLE001
            self._disable(f"even the offline run could not be opened ({_first_line(err)})")
            from pytorch_lightning.loggers.logger import DummyExperiment
            return DummyExperiment()

    def _switch_offline(self, reason: str) -> bool:
        """Re-open the run offline under the same id; False when it already is offline (nothing left to try)."""
        if self.fallback_reason is not None or self._wandb_init.get("mode") == "offline" \
                or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
            return False
        self.fallback_reason = reason
        self._close_quietly()
        os.environ["WANDB_MODE"] = "offline"
        self._wandb_init["mode"] = "offline"
        self._experiment = None
        log.warning(sync_hint(Path(self._save_dir or "."), reason))
        return True

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = reason
            log.warning("W&B: %s; W&B logging is off for the rest of this run (the run folder keeps metrics.json "
                        "and the checkpoints)", reason)
        self._experiment = None

    def _close_quietly(self, timeout_s: float = 10.0) -> None:
        """Finish a half-open online run without waiting on a server that does not answer."""
        try:
            import wandb
            if wandb.run is None:
                return
            worker = threading.Thread(target=lambda: wandb.finish(exit_code=1), daemon=True)
            worker.start()
            worker.join(timeout_s)
        except Exception:  # noqa: BLE001
            pass


def _guarded(name: str):
    def method(self, *args, **kwargs):
        if self.disabled_reason is not None:
            return None
        call = getattr(super(FallbackWandbLogger, self), name)
        try:
            return call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B never aborts a run
            if name != "finalize" and self._switch_offline(f"logging to W&B failed ({_first_line(err)})"):
                try:
                    return call(*args, **kwargs)
                except Exception as again:  # noqa: BLE001
                    err = again
            self._disable(f"{name} failed ({_first_line(err)})")
            return None
    method.__name__ = name
    method.__doc__ = f"WandbLogger.{name}, switching to offline on a W&B failure."
    return method


for _name in GUARDED:
    setattr(FallbackWandbLogger, _name, _guarded(_name))
