"""Every option of every config group composes, resolves and points at importable code; key values are right."""
from __future__ import annotations

import re
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_config

GROUPS = ("model", "datamodule", "trainer", "logger", "callbacks")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


def all_targets(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append(node["_target_"])
        for v in node.values():
            found += all_targets(v)
    elif isinstance(node, list):
        for v in node:
            found += all_targets(v)
    return found


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_resolves_and_imports(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("datamodule", "imagefolder"):
        overrides.append("datamodule.num_classes=5")  # else read from the class folders (none exist here)
    cfg = compose_config(overrides, tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    body = {k: v for k, v in cfg.items() if k != "hydra"}
    resolved = OmegaConf.to_container(OmegaConf.create(body), resolve=True)
    targets = all_targets(resolved)
    assert targets, f"{group}={option} builds nothing"
    for target in targets:
        hydra.utils.get_object(target)  # raises if the module or attribute does not exist
    # models take their data geometry from the datamodule: every geometry argument the model class accepts is set,
    # to the datamodule's value (an unconditional GAN takes no num_classes, the fully convolutional segmenter no
    # image_size)
    import inspect
    accepted = inspect.signature(hydra.utils.get_object(resolved["model"]["_target_"])).parameters
    keys = [k for k in ("num_classes", "channels", "image_size") if k in accepted]
    assert keys, f"model={resolved['model']['_target_']} takes none of num_classes, channels, image_size"
    for key in keys:
        assert resolved["model"][key] == resolved["datamodule"][key], key


def test_trainer_options(tmp_path):
    ddp = compose_config(["trainer=ddp_cpu"], tmp_path).trainer
    assert (ddp.accelerator, ddp.devices, ddp.strategy) == ("cpu", 2, "ddp")
    gpu = compose_config(["trainer=ddp"], tmp_path).trainer
    assert (gpu.accelerator, gpu.devices, gpu.strategy) == ("gpu", -1, "ddp")
    assert compose_config([], tmp_path).trainer.accelerator == "auto"
    assert compose_config(["trainer=cpu"], tmp_path).trainer.accelerator == "cpu"


def test_model_sets_epochs_but_command_line_wins(tmp_path):
    assert compose_config(["model=cnn"], tmp_path).trainer.max_epochs == 8
    assert compose_config(["model=cnn", "trainer.max_epochs=3"], tmp_path).trainer.max_epochs == 3
    assert compose_config(["model=cnn", "trainer=ddp_cpu"], tmp_path).trainer.max_epochs == 8


def test_run_folders_have_sub_second_precision(tmp_path):
    cfg = compose_config([], None)
    pattern = OmegaConf.to_container(cfg.hydra, resolve=False)["run"]["dir"]
    assert "%f" in pattern
    assert re.search(r"%f", OmegaConf.to_container(cfg.hydra, resolve=False)["sweep"]["dir"])


def test_loggers_instantiate_without_network(tmp_path):
    cfg = compose_config(["logger=csv"], tmp_path)
    csv = hydra.utils.instantiate(cfg.logger.csv)
    assert Path(csv.log_dir).parent == tmp_path
    none = compose_config(["logger=none"], tmp_path).logger
    assert not none  # None or an empty node: no logger is built


def test_unknown_model_lists_the_available_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_config(["model=nope"], tmp_path)
    message = str(err.value)
    assert "model/nope" in message
    for option in options("model"):
        assert option in message


def test_unknown_key_is_rejected(tmp_path):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError
    with pytest.raises((ConfigCompositionException, ConfigAttributeError)) as err:
        compose_config(["trainer.max_epoch=3"], tmp_path)  # typo of max_epochs
    assert "max_epoch" in str(err.value)


@pytest.mark.parametrize("model", ["cnn", "dynconn"])
def test_the_readme_sweep_over_k_composes_for_every_job(model, tmp_path, caplog):
    """`python train.py -m model=cnn,dynconn model.k=5,10`: every job composes; only dynconn routes top-K, the
    dense cnn baseline says that k has no effect on it."""
    cfg = compose_config([f"model={model}", "model.k=10"], tmp_path)
    with caplog.at_level("WARNING"):
        net = hydra.utils.instantiate(cfg.model)
    if model == "dynconn":
        assert net.k == 10
        assert "no effect" not in caplog.text
    else:
        assert isinstance(net.head, torch.nn.Linear)
        assert "model.k=10 has no effect" in caplog.text
