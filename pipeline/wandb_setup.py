"""Decide, before any WandbLogger exists, whether W&B runs online or offline.

W&B must never prompt for a login nor wait on the network: with no credentials (or no route to the server) the run
is written offline into the run folder and one line says how to upload it later with `wandb sync`.
"""
from __future__ import annotations

import netrc
import os
import socket
import struct
from pathlib import Path

WANDB_HOST = "api.wandb.ai"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    base = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].split("/")[0]
    return rc.authenticators(base) is not None


def server_reachable(timeout: float = 2.0) -> bool:
    base = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].split("/")[0]
    host, _, port = base.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def configure_wandb(run_dir: str | Path, check_network: bool = True) -> str:
    """Set W&B's environment for this process and return the mode ("online", "offline" or "disabled").

    An explicit WANDB_MODE from the user is respected. Files (run, cache, artifacts) go below the run folder so the
    folder is self-contained and tests never write into the home directory.
    """
    run_dir = Path(run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ["WANDB_DIR"] = str(run_dir)
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / ".cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb" / ".data"))
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return "disabled" if mode == "disabled" else "offline"
    online = has_wandb_credentials() and (not check_network or server_reachable())
    os.environ["WANDB_MODE"] = "online" if online else "offline"
    return os.environ["WANDB_MODE"]


def sync_hint(run_dir: str | Path) -> str:
    return (f"W&B: no credentials or no network, so this run is logged offline under {Path(run_dir) / 'wandb'}. "
            f"Upload it later with: wandb sync {Path(run_dir) / 'wandb'}/offline-run-*")


def finish_wandb(wait_s: float = 60.0) -> None:
    """Close the active W&B run, if any, so the next job in this process starts its own (WandbLogger reuses it).

    The run's transaction log (`run-<id>.wandb`) is written by W&B's service process, which may still be
    flushing when `wandb.finish()` returns on a loaded machine; wait (up to `wait_s`) until its final `exit` record is
    on disk, so that a finished run folder is complete and `wandb sync` / pipeline.wandb_offline read all of it."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    run = wandb.run
    if run is None:
        return
    log_file = None
    try:  # offline and online runs keep a transaction log; a disabled run has none, and nothing is waited for
        log_file = Path(run.dir).parent / f"run-{run.id}.wandb"
    except Exception:  # noqa: BLE001
        pass
    keeps_log = log_file is not None and log_file.is_file()
    wandb.finish()
    if keeps_log:
        wait_for_complete_log(log_file, wait_s)


def wait_for_complete_log(path: Path, wait_s: float = 60.0) -> bool:
    """True once the W&B transaction log at `path` ends with its `exit` record (False after `wait_s`)."""
    import time

    from pipeline.wandb_offline import has_exit_record
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.is_file() and has_exit_record(path):
                return True
        except (OSError, ValueError, struct.error):
            pass  # partially written: try again
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
