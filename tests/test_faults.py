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
# a short ProtoPNet schedule on a small shapes set (32 px, 6 steps of 40 per epoch): warm, joint, push + last layer,
# joint, joint, joint, push + last layer
PROTOPNET = ["model=protopnet", "callbacks=minimal", "logger=csv", "datamodule.image_size=32", "datamodule.n_train=240",
             "datamodule.n_val=60", "datamodule.n_test=120", "datamodule.batch_size=40", "model.prototypes_per_class=2",
             "model.prototype_dim=32", "model.schedule.warm_epochs=1", "model.schedule.push_start=2",
             "model.schedule.push_every=3", "model.schedule.last_layer_epochs=1", "trainer.max_epochs=7",
             "model.push_batch_size=120", "trainer.log_every_n_steps=2"]
PROTOPNET_STEPS = 6


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
@pytest.mark.timeout(900)
def test_kill9_between_protopnet_push_blocks_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    """Pushes start epochs 2 and 6; the kill comes in the middle of epoch 4, between the two push blocks, where
    val/acc_pushed (the best checkpoint's monitor) is 0 again. The resumed run must end exactly like an
    uninterrupted one: same epochs, phase and push history, CSV history, test accuracy."""
    marker = tmp_path / "paused"
    marker.write_text("")  # the reference run gets the same callbacks but never pauses
    reference = tmp_path / "reference"
    assert start(reference, *PROTOPNET, *pause_at(marker, 4, 2)).wait(timeout=600) == 0, output(reference)
    marker.unlink()
    killed = tmp_path / "killed"
    proc = start(killed, *PROTOPNET, *pause_at(marker, 4, 2))
    wait_for(marker, proc, timeout=600)
    kill9(proc)
    state = checkpoint(killed / "checkpoints" / "last.ckpt")
    # the end of epoch 3, although the monitored val/acc_pushed last improved in epoch 2; the last-layer epochs
    # after each push (2 and 6) take no gradient step: the convex solve of the push fitted the last layer
    assert state["epoch"] == 3 and state["global_step"] == 3 * PROTOPNET_STEPS
    assert [h["epoch"] for h in state["protopnet"]["phase_history"]] == [0, 1, 2, 3]
    assert [h["epoch"] for h in state["protopnet"]["push_history"]] == [2]
    assert payload(killed)["status"] == "running"  # written at the start: the folder says what it was

    resumed = run([f"resume={killed}"], timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = checkpoint(killed / "checkpoints" / "last.ckpt")["protopnet"]
    want = checkpoint(reference / "checkpoints" / "last.ckpt")["protopnet"]
    phases = [(h["epoch"], h["phase"]) for h in got["phase_history"]]
    assert phases == [(0, "warm"), (1, "joint"), (2, "last_layer"), (3, "joint"), (4, "joint"), (5, "joint"),
                      (6, "last_layer")]
    assert phases == [(h["epoch"], h["phase"]) for h in want["phase_history"]]
    pushes = [(h["epoch"], h["global_step"]) for h in got["push_history"]]
    assert pushes == [(h["epoch"], h["global_step"]) for h in want["push_history"]] == \
        [(2, 2 * PROTOPNET_STEPS), (6, 5 * PROTOPNET_STEPS)]
    # the same prototypes were pushed: the same training in between
    assert [h["mean_distance"] for h in got["push_history"]] == [h["mean_distance"] for h in want["push_history"]]
    done, ref = payload(killed), payload(reference)
    assert done["status"] == "completed" and done["epochs_completed"] == ref["epochs_completed"] == 7
    assert done["global_step"] == ref["global_step"] == 5 * PROTOPNET_STEPS  # nothing redone, nothing skipped
    assert done["resumed_from"]["epochs_completed"] == 4 and done["run_id"] == done["resumed_from"]["run_id"]
    assert [a["status"] for a in done["attempts"]] == ["running"]  # the killed start, as it was left
    assert abs(done["metrics"]["test/acc"] - ref["metrics"]["test/acc"]) <= 0.01
    # in fact identical: the random streams and the data order continue from the checkpoint (seeded, CPU)
    assert done["metrics"]["test/acc"] == ref["metrics"]["test/acc"]
    rows, ref_rows = csv_rows(killed), csv_rows(reference)
    assert per_epoch(rows, "val/acc") == per_epoch(ref_rows, "val/acc")
    # the CSV history: the killed start's rows up to its checkpoint, then the resumed ones, every step once
    assert [(r["epoch"], r["step"]) for r in rows] == [(r["epoch"], r["step"]) for r in ref_rows]
    assert not list((killed / "checkpoints").glob("*-v1*"))  # no version-suffixed copies


@pytest.mark.slow
def test_kill9_mid_epoch_of_a_plain_model_then_resume(tmp_path):
    """cnn: killed in epoch 1 (step 5 of 9), resumed from the end of epoch 0; the CSV keeps epoch 0's rows from the
    killed start and has every later step once"""
    marker, run_dir = tmp_path / "paused", tmp_path / "run"
    proc = start(run_dir, *DIGITS, *pause_at(marker, 1, 4))
    wait_for(marker, proc)
    kill9(proc)
    state = checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert state["epoch"] == 0 and state["global_step"] == STEPS_PER_EPOCH
    before = csv_rows(run_dir)
    kept = [r for r in before if int(r["step"]) < STEPS_PER_EPOCH]  # the steps the checkpoint holds
    assert kept and len(kept) < len(before)  # the killed start had logged steps of epoch 1 too
    resumed = run([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done = payload(run_dir)
    assert done["status"] == "completed" and done["epochs_completed"] == 3
    assert done["global_step"] == 3 * STEPS_PER_EPOCH
    rows = csv_rows(run_dir)
    # the killed start's history up to its checkpoint is kept as it was (later columns such as test/acc are added
    # empty); its rows of epoch 1, which the resume repeated, are replaced
    assert [{k: r[k] for k in kept[0]} for r in rows[:len(kept)]] == kept
    logged = [(r["step"], tuple(k for k, v in r.items() if v and k not in ("step", "epoch"))) for r in rows]
    assert len(logged) == len(set(logged))  # nothing logged twice
    assert sorted(per_epoch(rows, "val/acc")) == [0, 1, 2] and "test/acc" in rows[-1] and rows[-1]["test/acc"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if "-v1" in p.name) == []


# ----- SIGTERM / SIGINT -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_last_checkpoint_records_interrupted_and_resumes(tmp_path, signum):
    marker, run_dir = tmp_path / "paused", tmp_path / "run"
    proc = start(run_dir, *DIGITS, *pause_at(marker, 1, 2))
    wait_for(marker, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum, output(run_dir)[-3000:]
    p = payload(run_dir)
    assert p["status"] == "interrupted" and p["interrupted_by"] == signal.Signals(signum).name
    assert p["epochs_completed"] == 1 and p["global_step"] == STEPS_PER_EPOCH + 3
    assert "val/acc" in p["metrics"] and "train/loss_step" in p["metrics"]  # the metrics so far
    assert p["resume_command"] == f"python train.py resume={run_dir}"
    assert "error" not in p
    out = output(run_dir)
    assert f"Resume it with: python train.py resume={run_dir}" in out
    assert "Traceback" not in out
    state = checkpoint(run_dir / "checkpoints" / "last.ckpt")  # saved at the step the signal was honoured
    assert state["global_step"] == STEPS_PER_EPOCH + 3
    if signum == signal.SIGINT:
        return  # the resume itself is the same for both signals
    resumed = run(p["resume_command"].split()[2:])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done = payload(run_dir)
    assert done["status"] == "completed" and done["epochs_completed"] == 3
    assert done["global_step"] == 3 * STEPS_PER_EPOCH  # the rest of epoch 1, then epoch 2: nothing redone or skipped
    assert done["attempts"][0]["status"] == "interrupted"
    steps = [int(r["step"]) for r in csv_rows(run_dir) if r.get("train/loss_step")]
    assert steps == sorted(set(steps))  # one row per logged step, in order


def processes_of(run_dir: Path) -> list[int]:
    """pids whose command line names the run folder (the DDP children re-run train.py with hydra.run.dir=<run>)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sigterm_under_ddp_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM to the launching process only (as `kill <pid>` does): it reaches rank 1 through the launcher, the
    ranks agree at the next step, save one last.ckpt and all exit; none waits in a collective."""
    marker, run_dir = tmp_path / "paused", tmp_path / "run"
    proc = start(run_dir, "trainer=ddp_cpu", *DIGITS, *pause_at(marker, 1, 2))
    wait_for(marker, proc, timeout=400)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output(run_dir)[-3000:]
    time.sleep(1)
    assert processes_of(run_dir) == []  # rank 1 ended too
    p = payload(run_dir)
    steps = 4  # 1257 training images over 2 ranks in batches of 128, the ragged last batch dropped
    assert p["status"] == "interrupted" and p["world_size"] == 2 and p["epochs_completed"] == 1
    assert p["global_step"] == steps + 3 == checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]


# ----- kill -9 during a checkpoint write -----------------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    marker, run_dir = tmp_path / "writing", tmp_path / "run"
    slow = ["+callbacks.slow._target_=tests.helpers.SlowCheckpointWrite", f"+callbacks.slow.marker={marker}",
            "+callbacks.slow.epoch=1"]
    proc = start(run_dir, *DIGITS, *slow)
    wait_for(marker, proc)
    kill9(proc)
    leftovers = list((run_dir / "checkpoints").glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written file
    state = checkpoint(run_dir / "checkpoints" / "last.ckpt")  # the previous complete checkpoint survives
    assert state["epoch"] == 0 and state["global_step"] == STEPS_PER_EPOCH
    resumed = run([f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # removed when the run restarted
    done = payload(run_dir)
    assert done["status"] == "completed" and done["epochs_completed"] == 3
    assert done["global_step"] == 3 * STEPS_PER_EPOCH
    assert "Removed 1 temporary file" in (run_dir / "train.log").read_text()


# ----- W&B that does not answer, or answers 401 -----------------------------------------------------------------------
class SilentServer:
    """Accepts TCP connections and never answers (a hung proxy or server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)  # held open, never read or answered

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


class Unauthorized(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        body = b'{"errors": [{"message": "user is not logged in"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def wandb_server(request):
    if request.param == "silent":
        server = SilentServer()
        yield request.param, server.port
        server.close()
    else:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield request.param, httpd.server_address[1]
        httpd.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("wandb_server", ["silent", "401"], indirect=True)
def test_wandb_server_failure_falls_back_to_offline_with_one_line(tmp_path, wandb_server):
    kind, port = wandb_server
    environ = env(WANDB_BASE_URL=f"http://127.0.0.1:{port}", WANDB_API_KEY="0123456789" * 4)
    environ.pop("WANDB_MODE", None)
    run_dir = tmp_path / "run"
    began = time.monotonic()
    proc = run([*DIGITS, "logger=wandb", "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run_dir}"],
               environ=environ, timeout=200)
    seconds = time.monotonic() - began
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    p = payload(run_dir)
    assert p["status"] == "completed" and p["epochs_completed"] == 1
    assert p["wandb"]["mode"] == "offline" and p["wandb"]["check_seconds"] <= 10
    assert ("did not answer within" if kind == "silent" else "rejected the API key (HTTP 401)") in p["wandb"]["reason"]
    hints = [line for line in out.splitlines() if "wandb sync" in line]
    assert len(hints) == 1, hints  # ONE line, with the command that uploads the run later
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert seconds < 150  # the W&B check costs seconds, not the 97 s of a hanging wandb.init


# ----- every bad setting: key, value, valid range, before anything heavy ----------------------------------------------
BAD = [
    (["trainer.max_epochs=abc"], r"trainer\.max_epochs='abc': must be an integer >= 1"),
    (["trainer.max_epochs=0"], r"trainer\.max_epochs=0: must be an integer >= 1"),
    (["trainer.max_epochs=2.5"], r"trainer\.max_epochs=2\.5: must be an integer >= 1.*not a fraction"),
    (["trainer.max_epochs=-1"], r"trainer\.max_epochs=-1 would train forever: no stopping rule"),
    (["trainer.max_epochs=3", "trainer.min_epochs=5"], r"trainer\.min_epochs=5 is larger than trainer\.max_epochs=3"),
    (["datamodule.batch_size=0"], r"datamodule\.batch_size=0: must be an integer >= 1"),
    (["datamodule.batch_size=-5"], r"datamodule\.batch_size=-5: must be an integer >= 1"),
    (["datamodule.num_workers=-1"], r"datamodule\.num_workers=-1: must be an integer >= 0"),
    (["datamodule=digits", "datamodule.val_fraction=1.5"],
     r"datamodule\.val_fraction=1\.5: must be a finite number in \[0, 1\)"),
    (["datamodule.probe_size=0"], r"datamodule\.probe_size=0: must be an integer >= 1 or null"),
    (["datamodule.distractor_prob=nan"], r"datamodule\.distractor_prob=nan: must be a finite number in \[0, 1\]"),
    (["datamodule.channels=2"], r"datamodule\.channels=2: choose one of 1, 3 or null"),
    (["model=cnn", "model.optimizer.lr=nan"], r"model\.optimizer\.lr=nan: must be a finite number > 0"),
    (["model=cnn", "model.optimizer.lr=-1"], r"model\.optimizer\.lr=-1: must be a finite number > 0"),
    (["model=cnn", "model.dropout=1.0"], r"model\.dropout=1\.0: must be a finite number in \[0, 1\)"),
    (["model.phase_lrs.joint.backbone=inf"], r"model\.phase_lrs\.joint\.backbone=inf: must be a finite number > 0"),
    (["model.coefs.sep=nan"], r"model\.coefs\.sep=nan: must be a finite number"),
    (["model.prototypes_per_class=0"], r"model\.prototypes_per_class=0: must be an integer >= 1"),
    (["model=dynconn", "model.k=2.7"], r"model\.k=2\.7: must be an integer >= 1 or null, not a fraction"),
    (["model=dynconn", "model.k=0"], r"model\.k=0: must be an integer >= 1"),
    (["trainer.devices=0"], r"trainer\.devices=0: must be an integer >= 1, -1"),
    (["+trainer.precision=17"], r"trainer\.precision=17: choose one of"),
    (["ckpt_path=/nonexistent/last.ckpt"], r"ckpt_path='/nonexistent/last\.ckpt': does not exist"),
    (["channels_last=maybe"], r"channels_last='?maybe'?: must be true or false"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_is_refused_with_key_value_and_range(overrides, message, tmp_path):
    from core.errors import ConfigError
    from pipeline.validate import validate_config
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


@pytest.mark.parametrize("overrides", [
    [],
    ["model=cnn"], ["model=dynconn", "model.k=7"], ["model=capsnet"], ["model=icnn"],
    ["datamodule=imagefolder"], ["datamodule=cub200"], ["datamodule=digits"], ["trainer=ddp_cpu"],
    ["trainer.max_epochs=-1", "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
     "+callbacks.stop.monitor=val/loss", "model=dynconn", "model.scheduler.T_max=10"],
    ["trainer.max_epochs=-1", "+trainer.max_steps=100", "model.schedule.final_push=false"],
])
def test_shipped_configs_pass_validation(overrides, tmp_path):
    from pipeline.validate import validate_config
    validate_config(compose_config(overrides, tmp_path))


def test_several_bad_settings_are_listed_together(tmp_path):
    from core.errors import ConfigError
    from pipeline.validate import validate_config
    with pytest.raises(ConfigError, match=r"2 settings are invalid:\n  - .*batch_size=0.*\n  - .*model\.k=2\.7"):
        validate_config(compose_config(["model=dynconn", "datamodule.batch_size=0", "model.k=2.7"], tmp_path))


def test_dynamic_k_never_truncates_k():
    from core.errors import ConfigError
    from models.dynconn import DynamicKLinear
    with pytest.raises(ConfigError, match=r"model\.k=2\.7: K counts connections"):
        DynamicKLinear(16, 3, 2.7)
    assert DynamicKLinear(16, 3, 4.0).k == 4


def test_bad_setting_prints_one_line_and_keeps_the_traceback_in_train_log(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([*DIGITS, "trainer.max_epochs=0", f"hydra.run.dir={run_dir}"], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "trainer.max_epochs=0: must be an integer >= 1" in out
    assert "Traceback" not in out and "AssertionError" not in out and "KeyError" not in out
    assert f"full traceback in {run_dir / 'train.log'}" in out
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "ConfigError: trainer.max_epochs=0" in log
    p = payload(run_dir)
    assert p["status"] == "failed" and "trainer.max_epochs=0" in p["error"] and "epochs_completed" not in p


def test_run_folder_that_is_a_file_is_refused_in_one_line(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("not a folder")
    proc = run([*DIGITS, f"paths.log_dir={blocker}"], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    assert f"lies below {blocker}, which is a file; move the file away or choose another folder" in out


def test_data_folder_that_is_a_file_names_the_option(tmp_path):
    from core.errors import ConfigError
    from datamodules.errors import DataError
    from datamodules.digits import DigitsDataModule
    from pipeline.validate import validate_config
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"datamodule\.data_dir='.*data': is a file, not a folder"):
        validate_config(compose_config([f"paths.data_dir={blocker}"], tmp_path / "run"))
    with pytest.raises(DataError, match=r"datamodule\.data_dir=.*is a file, not a folder"):
        DigitsDataModule(blocker / "sub")


# ----- resume=<run folder> --------------------------------------------------------------------------------------------
def test_resume_expands_the_recorded_overrides(tmp_path, monkeypatch):
    from pipeline import resume
    monkeypatch.delenv(resume.EXPANDED_ENV, raising=False)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- model=cnn\n- trainer.max_epochs=3\n- ckpt_path=/old.ckpt\n")
    # no checkpoint yet (killed in its first epoch): restart in the same folder with the same overrides
    args = resume.expand([f"resume={run_dir}"])
    assert args == ["model=cnn", "trainer.max_epochs=3", f'resume="{run_dir}"', f'hydra.run.dir="{run_dir}"',
                    "hydra.mode=RUN"]
    monkeypatch.delenv(resume.EXPANDED_ENV)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    args = resume.expand([f"resume={run_dir}", "trainer.max_epochs=6", "logger=csv"])
    assert args[:3] == ["model=cnn", "trainer.max_epochs=6", "logger=csv"]  # a longer run: allowed
    assert f'ckpt_path="{run_dir / "checkpoints" / "last.ckpt"}"' in args
    assert resume.expand(["x=1"]) == ["x=1"]  # the DDP children of the resumed run: expanded already


@pytest.mark.parametrize("extra,message", [
    (["model=protopnet"], r"model=protopnet would change them"),
    (["datamodule.n_train=10"], r"datamodule\.n_train=10 would change them"),
    (["ckpt_path=/x.ckpt"], r"give either resume=<run folder> or ckpt_path=<file>"),
    (["-m"], r"cannot be combined with -m"),
])
def test_resume_refuses_what_would_change_the_run(extra, message, tmp_path, monkeypatch):
    from pipeline import resume
    monkeypatch.delenv(resume.EXPANDED_ENV, raising=False)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- model=cnn\n")
    with pytest.raises(resume.ResumeError, match=message):
        resume.expand([f"resume={tmp_path}", *extra])


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, monkeypatch):
    from pipeline import resume
    monkeypatch.delenv(resume.EXPANDED_ENV, raising=False)
    with pytest.raises(resume.ResumeError, match="does not exist; pass a run folder"):
        resume.expand([f"resume={tmp_path / 'nope'}"])
    (tmp_path / "f").write_text("")
    with pytest.raises(resume.ResumeError, match="is a file; pass the run folder"):
        resume.expand([f"resume={tmp_path / 'f'}"])
    with pytest.raises(resume.ResumeError, match=r"is not a run folder of train\.py"):
        resume.expand([f"resume={tmp_path}"])
    proc = run([f"resume={tmp_path / 'nope'}"], timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("train.py: error: resume=")


# ----- a checkpoint of another model or data set ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cnn_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a tiny in-process cnn run on digits (2 steps)."""
    from tests.conftest import train_run
    run_dir = tmp_path_factory.mktemp("cnn-digits")
    train_run(["model=cnn", "datamodule=digits", "callbacks=minimal", "logger=none", "trainer.max_epochs=1",
               "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false"], run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("overrides,message", [
    (["model=protopnet", "datamodule=digits"],
     r"was written by CNNClassifier on data set digits \(num_classes=10, channels=1, image_size=28\), but this run "
     r"is ProtoPNet on data set digits .*\(model differ\)"),
    (["model=cnn", "datamodule=shapes"],
     r"was written by CNNClassifier on data set digits .* but this run is CNNClassifier on data set shapes "
     r"\(num_classes=12, channels=3, image_size=64\) \(data, num_classes, channels, image_size differ\)"),
])
def test_checkpoint_of_another_model_or_data_set_names_what_made_it(overrides, message, digits_cnn_checkpoint,
                                                                    tmp_path):
    from core.errors import ConfigError
    from tests.conftest import train_run
    with pytest.raises(ConfigError, match=message):
        train_run([*overrides, "callbacks=minimal", "logger=none", f"ckpt_path={digits_cnn_checkpoint}"],
                  tmp_path / "run")
    assert payload(tmp_path / "run")["status"] == "failed"
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was trained


def test_checkpoint_without_identity_is_checked_by_its_weights(digits_cnn_checkpoint, tmp_path):
    """checkpoints written before identities were recorded: the weights tell"""
    from core.errors import ConfigError
    from tests.conftest import train_run
    state = checkpoint(digits_cnn_checkpoint)
    del state["interp_run"]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    with pytest.raises(ConfigError, match=r"does not fit CNNClassifier on data set digits .*head\.weight "
                                          r"\(10, 128\) vs \(12, 128\)"):
        train_run(["model=cnn", "datamodule=digits", "datamodule.num_classes=12", "callbacks=minimal",
                   "logger=none", f"ckpt_path={old}"], tmp_path / "run")


# ----- a full disk while a checkpoint is written ---------------------------------------------------------------------
def test_full_disk_says_no_space_first_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import tempfile

    from pipeline.checkpoint_io import AtomicCheckpointIO
    from pipeline.run_errors import one_line
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    real_mkstemp = tempfile.mkstemp

    def full_disk(*args, **kwargs):  # the temporary file lives on a full device (/dev/full: every write ENOSPC)
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"w": torch.zeros(100_000)}, path)
    assert err.value.errno == errno.ENOSPC
    assert one_line(err.value).startswith(f"No space left on device: writing the checkpoint {path} failed")
    assert "unexpected pos" not in one_line(err.value)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["w"], torch.ones(3))  # the previous one is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# ----- no network for a download --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "mnist", "cub200"])
def test_download_without_network_says_where_to_put_the_files(name, tmp_path, monkeypatch):
    from datamodules.errors import DataError
    from hydra.utils import instantiate
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: every request is refused at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen builds its global opener, with the proxies of that moment, on its first use: the one built here goes
    # with the test instead of sending every later request of this process to the dead proxy
    import urllib.request
    monkeypatch.setattr(urllib.request, "_opener", None)
    cfg = compose_config([f"datamodule={name}", "datamodule.download=true", f"paths.data_dir={tmp_path}"],
                         tmp_path / "run")
    dm = instantiate(cfg.datamodule)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    text = str(err.value)
    assert "cannot download" in text and "no network?" in text and "corrupt" not in text
    assert str(tmp_path) in text and "datamodule.download=false" in text


# ----- data problems found before training ---------------------------------------------------------------------------
def test_corrupt_test_image_is_found_before_training(tmp_path):
    from datamodules.errors import DataError
    from datamodules.imagefolder import ImageFolderDataModule
    from tests.data_fixtures import write_imagefolder
    write_imagefolder(tmp_path, per_class=4, splits=("train", "test"))
    (tmp_path / "test" / "emu" / "0.png").write_bytes(b"\\x89PNG truncated")
    dm = ImageFolderDataModule(tmp_path, image_size=8)
    with pytest.raises(DataError, match=r"cannot read image .*test/emu/0\.png \(test split\)"):
        dm.setup("fit")


def test_imagefolder_reads_its_classes_from_the_folders(tmp_path):
    import hydra

    from pipeline.training import fill_data_shape
    from tests.data_fixtures import write_imagefolder
    write_imagefolder(tmp_path / "flowers", classes=("daisy", "rose", "tulip"), per_class=3)
    cfg = compose_config(["datamodule=imagefolder", f"datamodule.data_dir={tmp_path / 'flowers'}", "model=cnn",
                          "datamodule.image_size=32"], tmp_path / "run")
    assert cfg.datamodule.num_classes is None
    dm = hydra.utils.instantiate(cfg.datamodule)
    fill_data_shape(cfg, dm)
    assert cfg.datamodule.num_classes == 3 and cfg.model.num_classes == 3
    assert hydra.utils.instantiate(cfg.model).num_classes == 3
    missing = compose_config(["datamodule=imagefolder", f"datamodule.data_dir={tmp_path / 'none'}"], tmp_path / "r")
    from datamodules.errors import DataError
    with pytest.raises(DataError, match=r"none/train not found; an image folder data set needs"):
        fill_data_shape(missing, hydra.utils.instantiate(missing.datamodule))


# ----- compare.py on a killed run and the run that continues it -------------------------------------------------------
def test_compare_groups_a_resumed_run_with_the_run_it_continues(tmp_path, capsys):
    import compare
    killed, other, resumed = tmp_path / "a-killed", tmp_path / "b-other", tmp_path / "c-resumed"
    for d in (killed, other, resumed):
        (d / ".hydra").mkdir(parents=True)
    # killed before it wrote metrics.json (an old run): only Hydra's files and config.yaml say what it was
    (killed / "config.yaml").write_text("datamodule:\n  _target_: datamodules.shapes.ShapesDataModule\n"
                                        "model:\n  _target_: models.protopnet.ProtoPNet\n")
    choices = {"datamodule": "shapes", "model": "protopnet"}
    (other / "metrics.json").write_text(json.dumps({"status": "completed", "run_id": "bbbb", "choices": choices,
                                                    "metrics": {"test/acc": 0.5}, "started": "2026-01-01 10:00:00"}))
    (resumed / "metrics.json").write_text(json.dumps({
        "status": "completed", "run_id": "aaaa", "choices": choices, "metrics": {"test/acc": 0.9},
        "started": "2026-01-01 11:00:00", "resumed_from": {"run_dir": str(killed), "run_id": "aaaa"}}))
    compare.compare([tmp_path], out=tmp_path / "cmp", quiet=True)
    err = capsys.readouterr().err
    assert "different data sets" not in err
    assert "a-killed -> " in err and "c-resumed are one run (id aaaa)" in err
    with (tmp_path / "cmp" / "comparison.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"].split("/")[-1] for r in rows] == ["a-killed", "c-resumed", "b-other"]  # together
    assert rows[0]["status"].endswith("resumed in " + rows[1]["run"]) and rows[0]["dataset"] == "shapes"


# ----- SLURM: requeue on the preemption signal ------------------------------------------------------------------------
def test_slurm_launcher_requeues_through_lightning(tmp_path, monkeypatch):
    import signal as sig

    from lightning_fabric.plugins.environments import SLURMEnvironment

    from pipeline.training import slurm_plugins
    cfg = compose_config(["hydra/launcher=slurm"], tmp_path)
    assert cfg.hydra.launcher.additional_parameters.signal == "USR1@90"
    assert slurm_plugins(cfg) == []  # not inside a SLURM job
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (plugin,) = slurm_plugins(cfg)
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue and plugin.requeue_signal == sig.SIGUSR1
    # the batch script asks SLURM for USR1 (instead of submitit's USR2) 90 s before the end
    from submitit.slurm.slurm import _make_sbatch_string
    script = _make_sbatch_string(command="python x.py", folder=str(tmp_path), additional_parameters=dict(
        cfg.hydra.launcher.additional_parameters))
    assert "#SBATCH --signal=USR1@90" in script and "USR2" not in script


def test_wandb_failure_after_the_check_switches_to_offline_under_the_same_id(tmp_path, monkeypatch, caplog):
    """wandb.init raising although the server check passed (quota, a server that broke meanwhile): the run is
    re-opened offline under the same id with one line; a logging call that keeps failing turns W&B off, never the
    run."""
    import wandb

    from pipeline.wandb_logger import FallbackWandbLogger
    from pipeline.wandb_setup import configure_wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    configure_wandb(tmp_path)  # the run folder's W&B directories
    monkeypatch.setenv("WANDB_MODE", "online")
    real_init, modes = wandb.init, []

    def init(**kwargs):
        modes.append(os.environ["WANDB_MODE"])
        if os.environ["WANDB_MODE"] == "online":
            raise wandb.errors.CommError("403 Forbidden: storage quota exceeded")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger = FallbackWandbLogger(project="p", save_dir=str(tmp_path), id="abcd1234")
    try:
        with caplog.at_level("WARNING"):
            run_obj = logger.experiment
            logger.log_metrics({"train/loss": 1.0}, step=0)
        assert modes == ["online", "offline"] and run_obj.id == "abcd1234"
        lines = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
        assert len(lines) == 1 and "storage quota exceeded" in lines[0] and "wandb sync" in lines[0]
        monkeypatch.setattr(type(run_obj), "log", lambda *a, **k: (_ for _ in ()).throw(BrokenPipeError("gone")))
        with caplog.at_level("WARNING"):
            logger.log_metrics({"train/loss": 2.0}, step=1)  # W&B's service died: logging off, the run goes on
            logger.log_metrics({"train/loss": 3.0}, step=2)
        assert logger.disabled_reason and "gone" in logger.disabled_reason
        assert sum("logging is off" in r.getMessage() for r in caplog.records) == 1
    finally:
        wandb.finish()
