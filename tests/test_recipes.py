"""Paper recipes (conf/experiment/*.yaml with a `recipe:` block): each composes with train.yaml, says which paper,
reported number, data and GPU hours it stands for, is listed in the README's recipe table, and every training recipe
runs one optimisation step, with its own architecture and image size, on tiny data written in the real on-disk
format (a CUB_200_2011 folder, MNIST idx files, Places365's easy-format image folders). Only the data, the batch
and the loaders shrink; ImageNet weights cannot be downloaded here, so those runs set model.pretrained=null."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config, train_run
from tests.data_fixtures import write_cub, write_mnist, write_places365_easyformat

EXPERIMENTS = ROOT / "conf" / "experiment"
PAPER_RECIPES = ("protopnet_vgg19_cub", "protopnet_resnet34_cub", "capsnet_mnist", "dynconn_resnet18_places365",
                 "icnn_vgg16_cub", "netdissect_resnet18_broden")
# training recipes -> the tiny data set they read (netdissect is for interpret.py: composed here, run by tests/test_interpret.py)
TRAINING = {"protopnet_vgg19_cub": "cub", "protopnet_resnet34_cub": "cub", "icnn_vgg16_cub": "cub",
            "capsnet_mnist": "mnist", "dynconn_resnet18_places365": "places365"}


def recipes() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if "recipe" in OmegaConf.load(p))


def header(name: str) -> str:
    lines = (EXPERIMENTS / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, s in enumerate(lines) if not s.startswith("#"))])


def test_the_paper_recipes_exist():
    assert set(PAPER_RECIPES) <= set(recipes())
    assert set(TRAINING) <= set(recipes())


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_composes_and_says_what_it_reproduces(name, tmp_path):
    cfg = compose_config([f"experiment={name}"], tmp_path)
    text = header(name)
    for field in ("Reported:", "Data:", "GPU hours:"):
        assert f"# {field}" in text, f"{name}.yaml's header lacks '{field}'"
    assert f"experiment={name}" in text  # the command
    r = cfg.recipe
    assert r.paper and r.reported and r.data and r.metric and float(r.gpu_hours) > 0
    assert "recipe" in cfg.tags
    # ImageNet weights: the header names the file the torch hub cache needs and the state-dict alternative
    if cfg.model.get("pretrained") == "imagenet":
        url = torchvision.models.get_model_weights(cfg.model.backbone).DEFAULT.url
        assert Path(url).name in text and "hub/checkpoints" in text and "model.pretrained=<path" in text
    for key in cfg:  # every interpolation resolves (data paths, recipe.scheduler)
        if key != "hydra" and OmegaConf.is_config(cfg[key]):
            OmegaConf.to_container(cfg[key], resolve=True)


def test_recipes_follow_their_papers(tmp_path):
    def compose(name):
        return compose_config([f"experiment={name}"], tmp_path)

    for name, backbone in (("protopnet_vgg19_cub", "vgg19"), ("protopnet_resnet34_cub", "resnet34")):
        cfg = compose(name)
        m, s = cfg.model, cfg.model.schedule
        assert (m.backbone, m.pretrained, cfg.datamodule.image_size, cfg.datamodule.batch_size) == \
               (backbone, "imagenet", 224, 80)
        assert (s.warm_epochs, s.push_start, s.push_every, s.last_layer_epochs) == (5, 10, 10, 20)
        assert (m.phase_lrs.joint.backbone, m.phase_lrs.last_layer.last_layer, m.joint_scheduler.step_size) == \
               (1e-4, 1e-4, 5)
        assert m.push_batch_size == 75 and m.prototypes_per_class == 10 and m.prototype_dim == 128
    cfg = compose("capsnet_mnist")
    assert (cfg.model.routing_iterations, cfg.model.reconstruction, cfg.model.reconstruction_weight) == (3, True, 5e-4)
    assert cfg.datamodule._target_.endswith("MNISTDataModule") and cfg.datamodule.shift == 2
    cfg = compose("dynconn_resnet18_places365")
    m = cfg.model
    assert (m.backbone, m.k, cfg.datamodule.num_classes, cfg.trainer.max_epochs) == ("resnet18", 5, 365, 90)
    assert (m.optimizer._target_, m.optimizer.lr, m.optimizer.momentum, m.optimizer.weight_decay) == \
           ("torch.optim.SGD", 0.1, 0.9, 1e-4)
    sched = OmegaConf.to_container(m.scheduler, resolve=True)
    assert sched == {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 30, "gamma": 0.1}
    cfg = compose("netdissect_resnet18_broden")
    d = cfg.callbacks.dissection
    assert (cfg.model.backbone, cfg.model.pretrained) == ("resnet18", "imagenet")
    assert d.layers == ["backbone.layer4"] and d.probe.endswith("broden1_224") and d.probe_size is None
    assert (d.quantile, d.iou_threshold) == (0.005, 0.04)


def test_readme_table_lists_every_recipe(tmp_path):
    readme = (ROOT / "README.md").read_text()
    for name in recipes():
        rows = [line for line in readme.splitlines() if line.startswith("|") and f"experiment={name}" in line]
        assert len(rows) == 1, f"README's recipe table needs one row with experiment={name}"
        cfg = compose_config([f"experiment={name}"], tmp_path)
        assert cfg.recipe.reported in rows[0]
        assert re.search(rf"\b{re.escape(str(cfg.recipe.gpu_hours))}\b", rows[0]), rows[0]


# ----- one optimisation step on tiny data in the real formats --------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-data")
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            where = root / kind
            if kind == "cub":  # every one of the 200 classes, 6 training images each (10% carved for validation)
                write_cub(where, n_classes=200, per_class=8)
                made[kind] = where
            elif kind == "mnist":
                write_mnist(where, n_train=60, n_test=20)
                made[kind] = where
            else:
                write_places365_easyformat(where, n_classes=365, per_class=1)
                made[kind] = where / "places365_standard"
        return made[kind]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_recipe_runs_one_optimisation_step(name, data_root, tmp_path):
    recipe = compose_config([f"experiment={name}"], tmp_path)
    overrides = [f"experiment={name}", f"datamodule.data_dir={data_root(TRAINING[name])}", "datamodule.batch_size=2",
                 "datamodule.num_workers=0", "logger=none", "callbacks.interpretation=false", "++trainer.max_steps=1",
                 "++trainer.limit_train_batches=1", "++trainer.limit_val_batches=1",
                 "++trainer.limit_test_batches=1"]
    if "pretrained" in recipe.model:
        overrides.append("model.pretrained=null")  # no downloads here; the recipe's own value is checked above
    metrics = train_run(overrides, tmp_path / "run")
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run["status"] == "completed", run.get("error")
    assert run["global_step"] == 1
    assert 0.0 <= metrics["test/acc"] <= 1.0 and run["metrics"]["test/acc"] == metrics["test/acc"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1
    hp = ckpt["hyper_parameters"]
    # the recipe's network at the recipe's image size, not a shrunken stand-in
    assert hp["num_classes"] == recipe.datamodule.num_classes
    assert hp["image_size"] == recipe.datamodule.image_size
    for key in ("backbone", "k", "routing_iterations", "prototypes_per_class", "filters"):
        if key in recipe.model:
            assert hp[key] == recipe.model[key], key
