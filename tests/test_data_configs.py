"""Every conf/datamodule/*.yaml builds its data module through Hydra, with the keys the model configs read."""
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.base import BaseDataModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "datamodule"
NAMES = ["shapes", "digits", "mnist", "fashion_mnist", "cifar10", "cub200", "imagefolder"]


@pytest.mark.parametrize("name", NAMES)
def test_datamodule_config_instantiates(name, tmp_path):
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "datamodule": OmegaConf.load(CONF / f"{name}.yaml")})
    for key in ("num_classes", "channels", "image_size"):
        assert key in cfg.datamodule.keys()  # `in` alone is False for a ??? value
    if name == "imagefolder":
        assert cfg.datamodule.num_classes is None  # read from the class folders of train/ (none here)
        cfg.datamodule.num_classes = 5
    dm = instantiate(cfg.datamodule)
    assert isinstance(dm, BaseDataModule)
    assert (dm.num_classes, dm.channels, dm.image_size) == (cfg.datamodule.num_classes, cfg.datamodule.channels,
                                                            cfg.datamodule.image_size)
    assert len(dm.mean) == dm.channels == len(dm.std)
    assert str(dm.data_dir).startswith(str(tmp_path))
    if name != "shapes":  # (the shapes probe would generate the data set)
        assert dm.probe_dataset() is None


def test_every_config_is_tested():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(NAMES)
