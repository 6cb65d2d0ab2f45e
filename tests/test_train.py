"""End-to-end runs of train(): default accuracy, run folder contents, offline W&B read back, resume, DDP, and the
error behaviour (NaN loss, truncated checkpoints, disagreeing config)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.base import NonFiniteLossError
from tests.conftest import ROOT
from pipeline.wandb_offline import find_run_file, has_exit_record, read_history

# a small shapes set: every test below generates it once (cached in .test-cache/data)
SMALL = ["datamodule.n_train=480", "datamodule.n_val=120", "datamodule.n_test=120", "datamodule.batch_size=60"]
QUICK = ["model=cnn", "callbacks=minimal", *SMALL]


def metrics_json(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_default_cnn_reaches_90_percent_on_shapes(trained_cnn_run):
    payload = metrics_json(trained_cnn_run)
    assert payload["status"] == "completed"
    assert payload["metrics"]["test/acc"] >= 0.90, payload["metrics"]
    assert (trained_cnn_run / "checkpoints" / "last.ckpt").is_file()
    assert Path(payload["best_checkpoint"]).is_file()
    assert (trained_cnn_run / "config.yaml").is_file()


def test_offline_wandb_run_is_self_contained_and_readable(run_train, tmp_path):
    run = tmp_path / "run"
    metrics = run_train([*QUICK, "logger=wandb", "trainer.max_epochs=2"], run)
    assert os.environ["WANDB_MODE"] == "offline"
    log_file = find_run_file(run)
    # train() returns only once W&B's service has written the whole log (it ends with the run's exit record)
    assert has_exit_record(log_file)
    truncated = tmp_path / "truncated.wandb"
    truncated.write_bytes(log_file.read_bytes()[: log_file.stat().st_size // 2])
    assert not has_exit_record(truncated)
    history = read_history(log_file)
    val_rows = [r for r in history if "val/acc" in r]
    assert [r["epoch"] for r in val_rows] == [0, 1]
    # the last logged val/acc is the one metrics.json reports
    assert val_rows[-1]["val/acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert any("test/acc" in r and r["test/acc"] == pytest.approx(metrics["test/acc"]) for r in history)
    payload = metrics_json(run)
    assert payload["status"] == "completed" and payload["epochs_completed"] == 2


def test_resume_continues_where_the_run_stopped(run_train, tmp_path):
    first = run_train([*QUICK, "logger=csv", "trainer.max_epochs=1", "test=false"], tmp_path / "a")
    steps_per_epoch = metrics_json(tmp_path / "a")["global_step"]
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 0 and state["global_step"] == steps_per_epoch
    run_train([*QUICK, "logger=csv", "trainer.max_epochs=3", "test=false", f"ckpt_path={ckpt}"], tmp_path / "b")
    resumed = metrics_json(tmp_path / "b")
    assert resumed["epochs_completed"] == 3
    assert resumed["global_step"] == 3 * steps_per_epoch  # continued, not restarted
    assert "val/acc" in first


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(run_train, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite.*last good checkpoint"):
        run_train([*QUICK, "logger=none", "trainer.max_epochs=3",
                   "+callbacks.poison._target_=tests.helpers.PoisonWeights", "+callbacks.poison.epoch=1"], run)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    payload = metrics_json(run)
    assert payload["status"] == "failed" and "NonFiniteLossError" in payload["error"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from pipeline.checkpoint_io import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies half-way through writing

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["a"], torch.ones(3))  # the previous complete file survives
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RuntimeError, match="unreadable or truncated"):
        io.load_checkpoint(path)


def test_disagreeing_class_count_names_the_options(run_train, tmp_path):
    with pytest.raises(Exception, match="num_classes"):
        run_train([*QUICK, "logger=none", "model.num_classes=5"], tmp_path / "run")


def test_image_size_too_small_names_the_option():
    from models.backbones import build_backbone
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="datamodule.image_size=8"):
        build_backbone("vgg16", 3, 8)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_cpu_run_with_two_processes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *QUICK, "logger=csv", "trainer.max_epochs=2",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    payload = metrics_json(tmp_path / "run")
    assert payload["status"] == "completed" and payload["world_size"] == 2
    assert payload["metrics"]["test/acc"] > 1 / 12  # learned something in 2 epochs
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_progress_bar_refresh_rate_and_how_to_turn_it_off(compose):
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

    from pipeline.training import PROGRESS_BAR_REFRESH_RATE, build_trainer
    cfg = compose(["model=cnn", "logger=none", "callbacks=minimal"])
    bar = build_trainer(cfg, [], []).progress_bar_callback
    # Lightning's own default redraws 100 times a second from its own thread (docs/overhead.md)
    assert isinstance(bar, RichProgressBar) and bar.refresh_rate == PROGRESS_BAR_REFRESH_RATE
    assert PROGRESS_BAR_REFRESH_RATE < RichProgressBar().refresh_rate
    assert build_trainer(compose(["+trainer.enable_progress_bar=false"]), [], []).progress_bar_callback is None
    assert build_trainer(cfg, [], [], enable_progress_bar=False).progress_bar_callback is None
    own = TQDMProgressBar(refresh_rate=5)  # a bar the callbacks bring is kept
    assert build_trainer(cfg, [own], []).progress_bar_callback is own
