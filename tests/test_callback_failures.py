"""A callback that fails mid-run does not cost the run (callbacks.<name>.on_error=skip, the default): the error is
recorded (train.log, metrics.json `interp_errors`), that callback is switched off, training and testing finish; the
decision is the same on every rank. on_error=raise stops the run as before."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SMALL = ["datamodule.n_train=480", "datamodule.n_val=120", "datamodule.n_test=120", "datamodule.batch_size=60"]
# checkpoints only, plus the failing test callback (interpretation stays on for it)
BOOM = ["model=cnn", "callbacks=minimal", "callbacks.interpretation=true", *SMALL, "logger=csv",
        "trainer.max_epochs=3", "+callbacks.boom._target_=tests.helpers.FailingInterpretation",
        "+callbacks.boom.fail_epoch=1"]


def test_a_failing_callback_is_recorded_switched_off_and_the_run_completes(run_train, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        metrics = run_train(BOOM, tmp_path / "run")
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["status"] == "completed" and payload["epochs_completed"] == 3
    assert "test/acc" in metrics and metrics["interp/boom/ok"] == 1.0  # logged at epoch 0, before the failure
    (err,) = payload["interp_errors"]
    assert err["callback"] == "boom" and err["epoch"] == 1 and err["rank"] == 0
    assert err["error"] == "RuntimeError: boom at epoch 1" and "raise RuntimeError" in err["traceback"]
    # switched off after epoch 1: it ran at epochs 0 and 1 only, although scheduled every epoch
    assert payload["interp_runs"] == {"boom": 2} and payload["interp_seconds"]["boom"] >= 0
    # the cost accounting: overhead = callback seconds / (fit seconds - callback seconds), and the run's one line
    assert payload["interp/overhead"] == pytest.approx(payload["interp_total_seconds"] / payload["training_seconds"],
                                                       abs=1e-3)
    assert 0 < payload["training_seconds"] < payload["seconds"] and metrics["interp/overhead"] >= 0
    assert f"interpretation took {100 * payload['interp/overhead']:.1f}% of training (boom " in caplog.text


def test_on_error_raise_stops_the_run(run_train, tmp_path):
    from callbacks.base import InterpretationError
    with pytest.raises(InterpretationError, match=r"'boom' failed on rank 0 at epoch 1: RuntimeError: boom"):
        run_train([*BOOM, "+callbacks.boom.on_error=raise"], tmp_path / "run")
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["status"] == "failed" and "boom at epoch 1" in payload["error"]


@pytest.mark.ddp
@pytest.mark.slow
def test_under_ddp_a_failure_on_one_rank_is_recorded_once_and_the_run_completes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *BOOM, "+callbacks.boom.fail_rank=1",
           f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((run / "metrics.json").read_text())
    assert payload["status"] == "completed" and payload["world_size"] == 2 and payload["epochs_completed"] == 3
    assert payload["interp_runs"] == {"boom": 2}
    (err,) = payload["interp_errors"]  # rank 0 writes metrics.json and names rank 1's error
    assert (err["callback"], err["epoch"], err["rank"]) == ("boom", 1, 1)
    assert err["error"] == "RuntimeError: boom at epoch 1" and "raise RuntimeError" in err["traceback"]
    log = (run / "train.log").read_text()
    assert "interpretation callback 'boom' failed on rank 1 at epoch 1" in log and "switched off" in log
    assert "Traceback" in log
