"""Runs that survive (issue 13): every failure case as a user meets it, mostly as real `python train.py` processes.

- kill -9 in the middle of an epoch, then `resume=<run folder>`: the resumed run redoes nothing and skips nothing, and
  ends exactly where an uninterrupted run ends (same epochs, steps, CSV history, accuracy), also for ProtoPNet killed
  between two push blocks (same phase and push history);
- SIGTERM and SIGINT: last.ckpt at the current step, metrics.json "interrupted" with the metrics so far and the
  resume command, exit code 128 + signal; the printed command resumes the run;
- kill -9 during a checkpoint write: the previous last.ckpt survives, the temporary file is removed on resume;
- W&B servers that accept and never answer, or answer 401: offline with one line, the run is not held up;
- every bad setting gives one clear line naming the key, the value and the valid range, before anything heavy;
- the other cases of the issue (checkpoint of another model or data set, full disk, no network for a download, a
  folder that is a file, a corrupt image, imagefolder's class count, compare.py on a resumed run, SLURM requeue).
"""
from __future__ import annotations

import csv
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose_config

# tiny runs: digits ships with scikit-learn (nothing to generate); 1150 training images = 9 steps of 128 per epoch
DIGITS = ["model=cnn", "datamodule=digits", "callbacks=minimal", "logger=csv", "trainer.max_epochs=3",
          "trainer.log_every_n_steps=2", "test=true"]
STEPS_PER_EPOCH = 9
# a short ProtoPNet schedule on a small shapes set: warm, joint, push, last layer, joint, joint, push, last layer
PROTOPNET = ["model=protopnet", "callbacks=minimal", "logger=csv", "datamodule.n_train=480", "datamodule.n_val=120",
             "datamodule.n_test=120", "datamodule.batch_size=60", "model.prototypes_per_class=2",
             "model.prototype_dim=32", "model.schedule.warm_epochs=1", "model.schedule.push_start=2",
             "model.schedule.push_every=3", "model.schedule.last_layer_epochs=1", "trainer.max_epochs=7",
             "model.push_batch_size=120"]


# ----- running train.py -----------------------------------------------------------------------------------------------
def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    e.pop("INTERP_RESUME_EXPANDED", None)
    return e


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def start(run: Path, *overrides: str, environ: dict | None = None) -> subprocess.Popen:
    log = open(run.parent / f"{run.name}.out", "a")
    return subprocess.Popen(command(*overrides, f"hydra.run.dir={run}"), cwd=ROOT, env=environ or env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def run(args: list[str], timeout: int = 300, environ: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=ROOT, env=environ or env(), capture_output=True, text=True,
                          timeout=timeout)


def output(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.out"
    return path.read_text() if path.exists() else ""


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.1)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def payload(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def per_epoch(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["epoch"]): float(r[key]) for r in rows if r.get(key)}


def pause_at(marker: Path, epoch: int, batch: int) -> list[str]:
    return ["+callbacks.pause._target_=tests.helpers.PauseOnce", f"+callbacks.pause.marker={marker}",
            f"+callbacks.pause.epoch={epoch}", f"+callbacks.pause.batch={batch}"]


# ----- kill -9 in the middle of an epoch, then resume -----------------------------------------------------------------
@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    marker = tmp_path / "paused"
    marker.write_text("")  # the reference run passes the same callbacks but never pauses
    reference = tmp_path / "reference"
    assert start(reference, *DIGITS, *pause_at(marker, 1, 4)).wait(timeout=300) == 0, output(reference)
    marker.unlink()

    killed = tmp_path / "killed"
    proc = start(killed, *DIGITS, *pause_at(marker, 1, 4))
    wait_for(marker, proc)
    kill9(proc)
    # the kill came in epoch 1, step 5 of 9: last.ckpt holds the end of epoch 0, whatever val/acc did
    state = checkpoint(killed / "checkpoints" / "last.ckpt")
    assert state["epoch"] == 0 and state["global_step"] == STEPS_PER_EPOCH
    assert payload(killed)["status"] == "running"  # written at the start: the folder says what it was

    resumed = run([f"resume={killed}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done, ref = payload(killed), payload(reference)
    assert done["status"] == "completed" and done["epochs_completed"] == 3
    assert done["global_step"] == 3 * STEPS_PER_EPOCH  # nothing redone, nothing skipped
    assert done["resumed_from"]["epochs_completed"] == 1 and done["resumed_from"]["global_step"] == STEPS_PER_EPOCH
    assert [a["status"] for a in done["attempts"]] == ["running"]  # the killed start, as it was left
    assert done["run_id"] == done["resumed_from"]["run_id"]
    # the same random streams from the checkpoint on: the same numbers as the uninterrupted run
    rows, ref_rows = csv_rows(killed), csv_rows(reference)
    assert per_epoch(rows, "val/acc") == per_epoch(ref_rows, "val/acc")
    assert done["metrics"]["test/acc"] == ref["metrics"]["test/acc"]
    # the CSV history: every step once, epoch 0 kept from the killed start, no -v1 checkpoints
    steps = [(r["step"], tuple(k for k, v in r.items() if v and k not in ("step", "epoch"))) for r in rows]
    assert len(steps) == len(set(steps))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert not list((killed / "checkpoints").glob("*-v1*"))
