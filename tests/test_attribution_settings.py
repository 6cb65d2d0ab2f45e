"""Settings of the attribution and featviz callbacks: wrong values fail at construction or in validate() (inside
trainer.fit, before the first training batch) with the option and the valid values; the yaml defaults are the
signature defaults; the typed results round-trip through JSON."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader

from algorithms.attribution import AttributionResult
from algorithms.featviz import FeatvizResult, FeatvizUnit, TopPatches
from callbacks.attribution import AttributionCallback
from callbacks.base import InterpretationCallback
from callbacks.featviz import FeatureVisualizationCallback
from core.errors import ConfigError
from core.probe import interpretation_mode
from core.results import SchemaError, load_result
from tests.test_attribution_helpers import SquaresData, fake_trainer, one_thread, small_cnn  # noqa: F401
from tests.test_featviz import TinyNet

ROOT = Path(__file__).resolve().parents[1]


# ----- at construction ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["nope"]}, r"callbacks\.attribution\.methods.*'nope'.*gradcam, cam, saliency"),
    ({"render_methods": ["gradcan"]}, r"callbacks\.attribution\.render_methods.*gradcam"),
    ({"deletion_methods": ["x"]}, r"callbacks\.attribution\.deletion_methods"),
    ({"sanity_method": "x"}, r"callbacks\.attribution\.sanity_method"),
    ({"methods": "gradcam"}, r"callbacks\.attribution\.methods.*list"),
    ({"deletion_steps": 0}, r"callbacks\.attribution\.deletion_steps"),
    ({"deletion_steps": 21}, r"callbacks\.attribution\.deletion_steps=21: use 1\.\.20"),
    ({"target": "label"}, r"callbacks\.attribution\.target='label'.*'true'.*'predicted'"),
    ({"split": "valid"}, r"callbacks\.attribution\.split='valid'.*train, val, test"),
    ({"max_images": 0}, r"callbacks\.attribution\.max_images"),
    ({"pointing_tolerance": 2}, r"callbacks\.attribution\.pointing_tolerance"),
])
def test_attribution_settings_checked_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttributionCallback(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"parametrisation": "dct"}, r"callbacks\.featviz\.parametrisation='dct'.*fourier, pixel"),
    ({"steps": 0}, r"callbacks\.featviz\.steps"),
    ({"num_units": 0}, r"callbacks\.featviz\.num_units"),
    ({"k_patches": 0}, r"callbacks\.featviz\.k_patches"),
    ({"split": "x"}, r"callbacks\.featviz\.split='x'.*train, val, test"),
    ({"lr": 0}, r"callbacks\.featviz\.lr"),
])
def test_featviz_settings_checked_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FeatureVisualizationCallback(**kwargs)


# ----- against the model, before training -------------------------------------------------------------------------
class SquaresDataModule(LightningDataModule):
    def __init__(self, n: int = 8):
        super().__init__()
        self.data = SquaresData(n=n, size=32)
        self.class_names = self.data.class_names

    def probe_dataset(self, split="val"):
        return self.data.probe

    def normalize(self, x01):
        return self.data.normalize(x01)

    def train_dataloader(self):
        probe = self.data.probe
        return DataLoader([(probe[i]["image"], probe[i]["label"]) for i in range(len(probe))], batch_size=4)


class BatchRecorder(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


@pytest.mark.parametrize("callback, option", [(lambda: AttributionCallback(layer="nope"), "attribution"),
                                              (lambda: FeatureVisualizationCallback(layer="nope"), "featviz")])
def test_bad_layer_fails_in_fit_before_the_first_training_batch(tmp_path, callback, option):
    recorder = BatchRecorder()
    trainer = Trainer(max_epochs=1, callbacks=[callback(), recorder], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    with pytest.raises(ConfigError, match=rf"callbacks\.{option}\.layer: 'nope' is not a probe layer.*"
                                          rf"backbone\.conv1, .*backbone\.conv4:pre_relu"):
        trainer.fit(small_cnn().train(), datamodule=SquaresDataModule())
    assert recorder.batches == 0


def test_good_settings_pass_validate_and_training_runs(tmp_path):
    recorder = BatchRecorder()
    cbs = [AttributionCallback(max_images=4, num_render=0, enabled=True), FeatureVisualizationCallback(
        layer="backbone.conv4:pre_relu", num_units=2, classes=False, steps=1, max_images=4)]
    trainer = Trainer(max_epochs=1, callbacks=[*cbs, recorder], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_train_batches=1)
    trainer.fit(small_cnn().train(), datamodule=SquaresDataModule())
    assert recorder.batches == 1
    assert "interp/attribution/gradcam/pointing_game" in trainer.callback_metrics
    assert "interp/featviz/activation_gain_min" in trainer.callback_metrics
    saved = FeatvizResult.load(tmp_path / "interp" / "featviz" / "epoch_000" / "featviz.json")
    assert saved.layer == "backbone.conv4:pre_relu"


def test_validate_checks_layers_and_sanity_layers_against_the_model(tmp_path):
    model, dm = small_cnn(), SquaresData(n=4, size=32)
    with pytest.raises(ConfigError, match=r"callbacks\.attribution\.layer: 'backbone\.conv4:pre_relu'.*"
                                          r"use 'backbone\.conv4'"):
        AttributionCallback(layer="backbone.conv4:pre_relu").validate(None, model, dm)
    with pytest.raises(ConfigError, match=r"callbacks\.attribution\.sanity_layers=5.*4 probe layers.*1\.\.4"):
        AttributionCallback(sanity_layers=5).validate(None, model, dm)
    with pytest.raises(ConfigError, match=r"callbacks\.featviz\.layer: 'backbone\.conv9'.*backbone\.conv3:pre_relu"):
        FeatureVisualizationCallback(layer="backbone.conv9").validate(None, model, dm)
    AttributionCallback(sanity_method=None, sanity_layers=5).validate(None, model, dm)  # no sanity check: fine
    FeatureVisualizationCallback(layer="backbone.conv2:pre_relu").validate(None, model, dm)


def test_cam_on_a_model_without_unit_head_is_skipped_with_one_log_line(tmp_path, caplog):
    """callbacks=default lists cam for every model: a model without a sum-over-units head gets the other methods."""
    torch.manual_seed(0)
    model, dm = TinyNet(num_classes=4).eval(), SquaresData(n=6, size=32)
    cb = AttributionCallback(max_images=6, num_render=2, render_methods=["gradcam", "cam"], batch_size=3)
    with caplog.at_level(logging.INFO, logger="callbacks.attribution"):
        cb.validate(None, model, dm)
        with interpretation_mode(model):
            metrics = cb.run(fake_trainer(tmp_path, dm), model, 0)
            cb.run(fake_trainer(tmp_path, dm, epoch=1), model, 1)
    assert [r.getMessage() for r in caplog.records if "cam skipped" in r.getMessage()] == [
        "callbacks.attribution.methods: cam skipped for TinyNet (the model has no sum-over-units head "
        "(core.protocol.UnitHead))"]
    assert not any(k.startswith("cam/") for k in metrics) and "gradcam/pointing_game" in metrics
    saved = AttributionResult.load(tmp_path / "interp" / "attribution" / "epoch_000" / "metrics.json")
    assert saved.layer == "stage3" and set(saved.metrics) == {"gradcam", "saliency"}


# ----- one place for each default ---------------------------------------------------------------------------------
def signature_defaults(cls) -> dict:
    out = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, InterpretationCallback):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


@pytest.mark.parametrize("name", ["attribution", "featviz"])
def test_yaml_defaults_are_the_signature_defaults(name):
    from hydra.utils import get_class
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "callbacks" / f"{name}.yaml"))[name]
    defaults = signature_defaults(get_class(cfg.pop("_target_")))
    assert set(cfg) <= set(defaults)
    assert {k: defaults[k] for k in cfg} == cfg


# ----- typed results ----------------------------------------------------------------------------------------------
def test_attribution_result_round_trips(tmp_path):
    result = AttributionResult(layer="backbone.conv4", target="true", num_images=64, epoch=2, metrics={
        "gradcam": {"pointing_game": 0.9, "pointing_game_strict": 0.7, "energy": 0.25, "deletion_auc": 0.14,
                    "sanity_spearman": 0.34},
        "cam": {"pointing_game": 0.875, "pointing_game_strict": 0.7, "energy": 0.3}})
    assert AttributionResult.from_json(result.to_json()) == result
    path = result.save(tmp_path / "metrics.json")
    assert AttributionResult.load(path) == result and load_result(path) == result
    assert result.flat()["gradcam/sanity_spearman"] == 0.34 and result.to_json()["schema"] == "attribution"
    with pytest.raises(SchemaError):
        FeatvizResult.load(path)
    with pytest.raises(SchemaError, match="unknown"):
        AttributionResult(layer="l", target="true", num_images=1, metrics={"gradcam": {"pointing": 1.0}})


def test_featviz_result_round_trips(tmp_path):
    result = FeatvizResult(
        layer="backbone.conv4", steps=32, parametrisation="fourier", epoch=3,
        metrics={"activation_gain_min": 12.5, "activation_gain_median": 80.0, "activation_final_mean": 3.25,
                 "activation_vs_data_min": 9.0},
        units=[FeatvizUnit("unit", 0, initial=0.0, final=3.0, data_mean=0.25, gain=3e6),
               FeatvizUnit("class", 1, initial=-0.5, final=9.0, name="green")],
        top_patches=TopPatches(dataset_index=[[4, 1]], position=[[[0, 1], [7, 7]]], activation=[[2.5, 1.0]],
                               map_size=[8, 8]), pooling="max")
    assert FeatvizResult.from_json(result.to_json()) == result and result.to_json()["pooling"] == "max"
    old = {k: v for k, v in result.to_json().items() if k != "pooling"}  # schema version 1: spatial means only
    assert FeatvizResult.from_json({**old, "schema_version": 1}).pooling == "mean"
    path = result.save(tmp_path / "featviz.json")
    assert FeatvizResult.load(path) == result and load_result(path) == result
    no_patches = FeatvizResult(layer="l", steps=1, parametrisation="pixel", metrics={}, units=[])
    assert FeatvizResult.from_json(no_patches.to_json()) == no_patches
