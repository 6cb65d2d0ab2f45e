"""model.pretrained for the small backbone: the backbone of another run on the same data (a whole model's state dict
or a Lightning checkpoint, keys under "backbone."), or its own state dict; every other case is refused by name."""
from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from models.backbones import build_backbone
from models.cnn import CNNClassifier
from models.protopnet import ProtoPNet


def _cnn(seed: int) -> CNNClassifier:
    torch.manual_seed(seed)
    return CNNClassifier(num_classes=4, channels=3, image_size=32)


@pytest.mark.parametrize("form", ["model_state_dict", "lightning_checkpoint", "backbone_state_dict"])
def test_a_protopnet_starts_from_the_backbone_of_a_cnn_run(tmp_path, form):
    cnn = _cnn(1)
    with torch.no_grad():  # running statistics too: a BN buffer that is not carried over would show here
        for m in cnn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = {"model_state_dict": cnn.state_dict(),
             "lightning_checkpoint": {"state_dict": cnn.state_dict(), "epoch": 3, "hyper_parameters": {"k": [1]}},
             "backbone_state_dict": cnn.backbone.state_dict()}[form]
    path = tmp_path / "weights.ckpt"
    torch.save(state, path)
    torch.manual_seed(2)
    proto = ProtoPNet(num_classes=4, channels=3, image_size=32, prototypes_per_class=1, prototype_dim=8,
                      pretrained=str(path))
    for name, value in cnn.backbone.state_dict().items():
        assert torch.equal(proto.backbone.state_dict()[name], value), name
    fresh = ProtoPNet(num_classes=4, channels=3, image_size=32, prototypes_per_class=1, prototype_dim=8)
    assert not torch.equal(fresh.backbone.stages.conv1[0][0].weight, cnn.backbone.stages.conv1[0][0].weight)


def test_pretrained_files_that_do_not_fit_are_refused_by_name(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(_cnn(0).state_dict(), path)
    with pytest.raises(ConfigError, match=r"model.pretrained=.*do not fit.*model.widths"):
        build_backbone("small", 3, 32, pretrained=str(path), widths=(8, 16, 32, 64))
    with pytest.raises(ConfigError, match=r"model.pretrained=.*do not fit.*missing"):
        build_backbone("small", 3, 32, pretrained=str(path), widths=(16, 32, 64, 128, 256))
    with pytest.raises(ConfigError, match=r"no such file"):
        build_backbone("small", 3, 32, pretrained=str(tmp_path / "absent.ckpt"))
    with pytest.raises(ConfigError, match=r"no ImageNet weights for model.backbone=small.*model=cnn"):
        build_backbone("small", 3, 32, pretrained="imagenet")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"not a readable torch file"):
        build_backbone("small", 3, 32, pretrained=str(tmp_path / "junk.pt"))
    torch.save({"note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match=r"holds no state dict"):
        build_backbone("small", 3, 32, pretrained=str(tmp_path / "empty.pt"))
