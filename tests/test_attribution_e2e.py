"""End to end: `python train.py` with the default callbacks on a small shapes set writes the attribution and featviz
metrics into metrics.json and their PNG/JSON files into the run folder, without disturbing training."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

SMALL = ["model=cnn", "datamodule.n_train=192", "datamodule.n_val=48", "datamodule.n_test=48", "datamodule.batch_size=32",
         "trainer.max_epochs=2", "logger=none", "callbacks=default", "callbacks.attribution.max_images=32",
         "callbacks.attribution.num_render=2", "callbacks.attribution.every_n_epochs=1",
         "callbacks.featviz.steps=4", "callbacks.featviz.every_n_epochs=1",
         "callbacks.featviz.max_images=32"]


def test_default_callbacks_in_a_training_run(run_train, tmp_path):
    metrics = run_train(SMALL, tmp_path / "run")
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "completed"
    for key in ("interp/attribution/gradcam/pointing_game", "interp/attribution/gradcam/energy",
                "interp/attribution/gradcam/deletion_auc", "interp/attribution/gradcam/sanity_spearman",
                "interp/attribution/cam/pointing_game", "interp/featviz/activation_gain_min"):
        assert key in saved["metrics"] and saved["metrics"][key] is not None, key
        assert metrics[key] == pytest.approx(saved["metrics"][key])
    for epoch in ("epoch_000", "epoch_001"):   # results every epoch
        assert (run / "interp" / "attribution" / epoch / "metrics.json").is_file()
        assert (run / "interp" / "featviz" / epoch / "featviz.json").is_file()
    # figures every render_every_n_epochs (5) and after the last epoch only
    assert not (run / "interp" / "attribution" / "epoch_000" / "overlays.png").exists()
    assert not (run / "interp" / "featviz" / "epoch_000" / "units.png").exists()
    assert (run / "interp" / "attribution" / "epoch_001" / "overlays.png").is_file()
    assert (run / "interp" / "featviz" / "epoch_001" / "units.png").is_file()


@pytest.mark.ddp
def test_default_callbacks_under_two_process_ddp(tmp_path):
    """`python train.py trainer=ddp_cpu` (2 gloo processes, Lightning relaunches the script): both callbacks run on
    every rank, reduce, and rank 0 writes their files; the run completes (no hang, no rank-0-only collective)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(root / "train.py"), "trainer=ddp_cpu", f"paths.output_dir={out}",
           f"hydra.run.dir={out}"] + [o for o in SMALL if not o.startswith("trainer.max_epochs")] + \
        ["trainer.max_epochs=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "completed"
    assert saved["metrics"]["interp/attribution/gradcam/pointing_game"] is not None
    assert saved["metrics"]["interp/featviz/activation_gain_min"] is not None
    assert (out / "interp" / "attribution" / "epoch_000" / "overlays.png").is_file()
    assert (out / "interp" / "featviz" / "epoch_000" / "patches.png").is_file()
