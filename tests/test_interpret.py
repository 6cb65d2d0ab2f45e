"""interpret.py: the interpretation callbacks once on a finished model, without training (pipeline/interpreting.py).

- a trained run's last checkpoint gives back the run's final dissection, composability and attribution numbers
- a pretrained backbone from a state dict is dissected on a Broden-format folder (the netdissect recipe's path), with
  the numbers of a direct `dissect()` call on the same weights
- a checkpoint of another model is refused, naming what made it; under 2-process DDP the numbers equal one process's
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from core.errors import ConfigError
from tests.conftest import ROOT, compose_config
from tests.data_fixtures import write_imagefolder
from tests.report_runs import RUN_OVERRIDES, report_run

# the run's overrides without its loggers (interpret logs to the CSV logger)
INTERPRET_OVERRIDES = [o for o in RUN_OVERRIDES if not o.startswith("logger=")] + ["logger=csv"]
COMPARED = ("interp/dissection/", "interp/composability/", "interp/attribution/")


def interpret_run(overrides: list[str], output_dir: Path) -> dict:
    from pipeline.interpreting import interpret
    cfg = compose_config(overrides, output_dir, config_name="interpret")
    with open_dict(cfg):
        del cfg["hydra"]
    return interpret(cfg)


def compared(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(COMPARED) and not k.endswith("/seconds")}


@pytest.mark.slow
def test_checkpoint_of_a_run_gives_back_its_final_dissection_and_attribution(tmp_path):
    run = report_run()  # ProtoPNet, every generic callback after each of its 2 epochs
    trained = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "interp"
    metrics = interpret_run([*INTERPRET_OVERRIDES, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], out)
    expected = compared(trained["metrics"])
    assert len(expected) >= 10, sorted(trained["metrics"])
    got = compared(metrics)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), (key, got[key], value)
    # the validation pass reports the interpreted weights' accuracy: that of the run's last epoch
    assert metrics["val/acc"] == pytest.approx(trained["metrics"]["val/acc"], abs=1e-6)

    # the same files as the run's last epoch, in the same place (epoch_001: the checkpoint's epoch)
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["status"] == "completed" and payload["interpreted"]["epoch"] == 1
    assert payload["interpreted"]["run_dir"] == str(run)
    assert payload["interp_errors"] == [] and payload["global_step"] == 0
    from algorithms.dissection_result import DissectionEpoch
    a = DissectionEpoch.load(run / "interp" / "dissection" / "epoch_001" / "dissection.json")
    b = DissectionEpoch.load(out / "interp" / "dissection" / "epoch_001" / "dissection.json")
    for layer in a.layers:
        ra, rb = a.layers[layer], b.layers[layer]
        torch.testing.assert_close(rb.thresholds, ra.thresholds, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rb.iou, ra.iou, rtol=1e-6, atol=1e-6)
    assert (out / "report.html").is_file()


@pytest.fixture(scope="module")
def resnet_state_dict(tmp_path_factory) -> Path:
    """A ResNet-18 state dict as torchvision saves one (random weights: nothing can be downloaded here)."""
    import torchvision
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_pretrained_backbone_is_dissected_on_a_broden_folder(resnet_state_dict, tmp_path):
    """The netdissect recipe's path: model.pretrained=<state dict>, datamodule=imagefolder, dissection on a Broden
    folder (the shapes set, which is stored in Broden's format)."""
    from algorithms.dissection import dissect
    from algorithms.dissection_result import DissectionEpoch
    from algorithms.probe_sets import open_broden, probe_view
    from datamodules.base import IMAGENET_MEAN, IMAGENET_STD
    from datamodules.shapes import ShapesDataModule
    from models.cnn import CNNClassifier

    shapes = ShapesDataModule(os.environ["INTERP_DATA_DIR"], n_train=480, n_val=120, n_test=120)
    shapes.prepare_data()
    images = tmp_path / "images"
    write_imagefolder(images, per_class=8, size=64)
    out = tmp_path / "interp"
    overrides = ["experiment=netdissect_resnet18_broden", f"model.pretrained={resnet_state_dict}",
                 f"datamodule.data_dir={images}", "datamodule.num_classes=null", "datamodule.image_size=64",
                 "datamodule.num_workers=0", "datamodule.batch_size=8", "datamodule.val_fraction=0.25",
                 "datamodule.test_fraction=0.25", f"callbacks.dissection.probe={shapes.folder}",
                 "callbacks.dissection.probe_split=val", "callbacks.dissection.probe_size=40",
                 "callbacks.composability=null", "callbacks.attribution=null", "callbacks.featviz=null",
                 "callbacks.decision_tree=null",
                 "logger=none"]
    metrics = interpret_run(overrides, out)
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["status"] == "completed" and payload["interp_runs"] == {"dissection": 1}
    assert payload["interpreted"] == {"checkpoint": None, "pretrained": str(resnet_state_dict)}
    result = DissectionEpoch.load(out / "interp" / "dissection" / "epoch_000" / "dissection.json")
    got = result.layers["backbone.layer4"]
    assert got.iou.shape[0] == 512  # ResNet-18's layer4 units

    # the same numbers from the plain algorithm on a model built from the same state dict, in the layout interpret.py
    # gives it (conf/train.yaml channels_last: the two layouts agree only to float rounding, ~5e-6 on ResNet-18)
    from pipeline.training import apply_memory_format
    model = apply_memory_format(CNNClassifier(num_classes=3, backbone="resnet18", pretrained=str(resnet_state_dict),
                                              image_size=64), True).eval()
    probe = probe_view(open_broden(shapes.folder, split="val", image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                   limit=40), 40)
    loader = torch.utils.data.DataLoader(probe, batch_size=64)
    with torch.no_grad():
        want = dissect(model, ["backbone.layer4"], loader, quantile=0.005, iou_threshold=0.04)["backbone.layer4"]
    torch.testing.assert_close(got.thresholds, want.thresholds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.iou, want.iou, rtol=1e-6, atol=1e-6)
    assert metrics["interp/dissection/interpretable_units"] == want.summary()["interpretable_units"]


def test_checkpoint_of_another_model_is_refused_naming_what_made_it(trained_cnn_run, tmp_path):
    ckpt = trained_cnn_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as err:
        interpret_run(["model=icnn", "logger=none", f"ckpt_path={ckpt}"], tmp_path / "interp")
    message = str(err.value)
    assert "CNNClassifier" in message and "shapes" in message and "interpret.py" in message
    payload = json.loads((tmp_path / "interp" / "metrics.json").read_text())
    assert payload["status"] == "failed" and "CNNClassifier" in payload["error"]


def test_no_interpretation_callback_is_an_error(trained_cnn_run, tmp_path):
    ckpt = trained_cnn_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="callbacks=minimal"):
        interpret_run(["model=cnn", "callbacks=minimal", "logger=none", f"ckpt_path={ckpt}"], tmp_path / "interp")


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_gives_the_single_process_numbers(trained_cnn_run, tmp_path):
    ckpt = trained_cnn_run / "checkpoints" / "last.ckpt"
    common = ["model=cnn", "logger=none", f"ckpt_path={ckpt}", "callbacks.featviz=null",
              "callbacks.dissection.probe_size=64", "callbacks.attribution.max_images=32"]
    single = interpret_run(common, tmp_path / "single")
    cmd = [sys.executable, str(ROOT / "interpret.py"), *common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert payload["world_size"] == 2 and payload["status"] == "completed"
    want, got = compared(single), compared(payload["metrics"])
    assert want and set(got) == set(want)
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), (key, got[key], value)
