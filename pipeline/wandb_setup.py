"""Decide, before any WandbLogger exists, whether W&B runs online or offline.

W&B must never prompt for a login nor make a run wait: the check below asks the server who the API key belongs to
(one small GraphQL query) within a total time budget of CHECK_BUDGET_S seconds, DNS included. No credentials, no
route, a server that accepts the connection and never answers, a rejected key (401/403), a quota or server error:
the run is written offline into the run folder, and ONE line says why and how to upload it later with `wandb sync`.
Failures after this check (wandb.init or a logging call raising) switch to offline the same way
(pipeline/wandb_logger.py).
"""
from __future__ import annotations

import base64
import json
import netrc
import os
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

WANDB_HOST = "api.wandb.ai"
# total seconds the online check may take (the bound is 10 s); a healthy server answers in well under 1 s
CHECK_BUDGET_S = 6.0
# bounds wandb.init itself once the check passed (its own default is 90 s)
INIT_TIMEOUT_S = 20


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").rstrip("/")


def _host() -> str:
    return base_url().split("://")[-1].split("/")[0]


def api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    auth = rc.authenticators(_host().split(":")[0]) or rc.authenticators(_host())
    return auth[2] if auth else None


def has_wandb_credentials() -> bool:
    return api_key() is not None


def check_server(key: str, budget_s: float = CHECK_BUDGET_S) -> str | None:
    """None when the server accepts `key` within `budget_s` seconds, else the reason (one short phrase)."""
    result: dict[str, str | None] = {}

    def ask() -> None:
        body = json.dumps({"query": "query Viewer { viewer { id } }"}).encode()
        request = urllib.request.Request(f"{base_url()}/graphql", data=body, method="POST", headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()})
        try:
            with urllib.request.urlopen(request, timeout=budget_s) as response:
                payload = json.loads(response.read().decode() or "{}")
            viewer = (payload.get("data") or {}).get("viewer")
            result["reason"] = None if viewer else "the server did not accept the API key"
        except urllib.error.HTTPError as err:
            what = {401: "rejected the API key", 403: "refused access (quota or permissions)",
                    429: "is rate-limiting this key (quota)"}.get(err.code, "answered with an error")
            result["reason"] = f"the server {what} (HTTP {err.code})"
        except urllib.error.URLError as err:
            result["reason"] = f"the server is unreachable ({err.reason})"
        except (OSError, ValueError) as err:  # timeouts, resets, a non-JSON answer
            result["reason"] = f"the server did not answer properly ({type(err).__name__}: {err})"

    # a daemon thread bounds everything, DNS resolution included (socket timeouts do not cover getaddrinfo)
    worker = threading.Thread(target=ask, name="wandb-check", daemon=True)
    worker.start()
    worker.join(budget_s)
    if worker.is_alive():
        return f"the server did not answer within {budget_s:g} s"
    return result.get("reason", "the check failed")


class WandbStatus:
    """What configure_wandb decided, for the warning line and metrics.json."""

    def __init__(self, mode: str, reason: str | None = None, seconds: float = 0.0):
        self.mode, self.reason, self.seconds = mode, reason, seconds

    def record(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "check_seconds": round(self.seconds, 2)}


def configure_wandb(run_dir: str | Path, check_network: bool = True) -> WandbStatus:
    """Set W&B's environment for this process and decide the mode ("online", "offline" or "disabled").

    An explicit WANDB_MODE from the user is respected. Files (run, cache, artifacts) go below the run folder so the
    folder is self-contained and tests never write into the home directory.
    """
    run_dir = Path(run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", str(INIT_TIMEOUT_S))
    os.environ["WANDB_DIR"] = str(run_dir)
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / ".cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb" / ".data"))
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return WandbStatus("disabled" if mode == "disabled" else "offline", "WANDB_MODE=" + mode)
    started = time.monotonic()
    key = api_key()
    if key is None:
        reason = "no W&B credentials (wandb login or WANDB_API_KEY)"
    elif not check_network:
        reason = None
    else:
        reason = check_server(key)
    os.environ["WANDB_MODE"] = "offline" if reason else "online"
    return WandbStatus(os.environ["WANDB_MODE"], reason, time.monotonic() - started)


def sync_hint(run_dir: str | Path, reason: str | None = None) -> str:
    why = reason or "no credentials or no network"
    return (f"W&B: {why}, so this run is logged offline under {Path(run_dir) / 'wandb'}. "
            f"Upload it later with: wandb sync {Path(run_dir) / 'wandb'}/offline-run-*")


FINISH_TIMEOUT_S = 60.0


def finish_wandb(wait_s: float = 60.0, exit_code: int = 0) -> None:
    """Close the active W&B run, if any, so the next job in this process starts its own (WandbLogger reuses it).

    The run's transaction log (`run-<id>.wandb`) is written by W&B's service process, which may still be
    flushing when `wandb.finish()` returns on a loaded machine; wait (up to `wait_s`) until its final `exit` record is
    on disk, so that a finished run folder is complete and `wandb sync` / pipeline.wandb_offline read all of it.
    An online run whose server stopped answering is given FINISH_TIMEOUT_S to upload, then left to `wandb sync`:
    closing W&B never fails nor stalls the run."""
    import logging
    log = logging.getLogger(__name__)
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    run = wandb.run
    if run is None:
        return
    log_file, run_dir = None, None
    try:  # offline and online runs keep a transaction log; a disabled run has none, and nothing is waited for
        log_file = Path(run.dir).parent / f"run-{run.id}.wandb"
        run_dir = Path(run.dir).parent
    except Exception:  # noqa: BLE001
        pass
    keeps_log = log_file is not None and log_file.is_file()
    online = os.environ.get("WANDB_MODE") == "online"
    done = threading.Event()

    def close() -> None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001 - W&B never fails a run
            log.warning("W&B: closing the run failed (%s: %s); its files are under %s", type(err).__name__, err,
                        log_file.parent if log_file else "the run folder")
        finally:
            done.set()

    if online:
        threading.Thread(target=close, name="wandb-finish", daemon=True).start()
        if not done.wait(FINISH_TIMEOUT_S):
            where = log_file.parent if log_file else run_dir
            log.warning("W&B: the server did not take the run's last data within %g s; the run is complete under "
                        "%s. Upload it later with: wandb sync %s", FINISH_TIMEOUT_S, where, where)
            return
    else:
        close()
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
