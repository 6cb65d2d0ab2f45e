"""Convolutional feature extractors shared by every model (cnn, protopnet, dynconn, icnn).

`build_backbone(name, ...)` returns a `Backbone`: an nn.Module mapping images [B, C, H, W] to a feature map
[B, out_channels, h, w], with `probe_layers` naming the conv stages interpretation callbacks may hook.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from core.errors import ConfigError

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg16", "vgg19", "densenet121")
BACKBONES = ("small",) + TORCHVISION_BACKBONES


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))


class Backbone(nn.Module):
    """A feature extractor whose named stages are the probe-able layers (in forward order)."""

    def __init__(self, stages: "OrderedDict[str, nn.Module]", out_channels: int):
        super().__init__()
        self.stages = nn.Sequential(stages)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    @property
    def probe_layers(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict((f"backbone.{name}", m) for name, m in self.stages.named_children())


def small_convnet(in_channels: int, image_size: int, widths=(16, 32, 64, 128)) -> Backbone:
    """A small VGG-style convnet for 28-64 px inputs: conv-BN-ReLU stages with 2x2 max-pooling between them.

    Pools are dropped once the map would fall below 7x7, so 28 px inputs end at 7x7 and 64 px inputs at 8x8.
    """
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    size, c_in = image_size, in_channels
    for i, width in enumerate(widths):
        layers = [conv_bn_relu(c_in, width)]
        last = i == len(widths) - 1
        if not last and size // 2 >= 7:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        stages[f"conv{i + 1}"] = nn.Sequential(*layers)
        c_in = width
    return Backbone(stages, c_in)


def read_state_dict(pretrained, name: str, runs: bool = False) -> "dict[str, torch.Tensor]":
    """The tensors of the file `model.pretrained` names: a state dict, or a checkpoint holding one under "state_dict"
    (a Lightning checkpoint of a run, e.g. <run>/checkpoints/last.ckpt; `runs`: say so when the file is missing)."""
    path = Path(str(pretrained))
    if not path.is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such file; give a path to a {name} state dict"
                          + (" or to a run's checkpoints/last.ckpt" if runs else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a Lightning checkpoint also pickles its hyper-parameters
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConfigError(f"model.pretrained={pretrained!r}: not a readable torch file ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.pretrained={pretrained!r}: holds no state dict (a mapping of names to tensors)")
    return state


def load_small_pretrained(backbone: "Backbone", pretrained) -> None:
    """model.pretrained for model.backbone=small: the backbone of another run on the same data (ProtoPNet, as in the
    paper, starts from a trained backbone: `python train.py model=cnn`, then `model=protopnet
    model.pretrained=<that run>/checkpoints/last.ckpt`). The file is the backbone's own state dict or a whole model's
    (its keys under "backbone." are taken); every backbone tensor must be there with the same shape."""
    if pretrained in (None, False, "none"):
        return
    if pretrained in (True, "imagenet", "DEFAULT"):
        raise ConfigError(f"model.pretrained={pretrained!r}: there are no ImageNet weights for model.backbone=small; "
                          f"train one on your data first (`python train.py model=cnn`) and pass model.pretrained=<that "
                          f"run>/checkpoints/last.ckpt, or pick a torchvision backbone (model.backbone=resnet18 ...)")
    state = read_state_dict(pretrained, "small backbone", runs=True)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        raise ConfigError(f"model.pretrained={pretrained!r}: its weights do not fit this small backbone "
                          f"({'missing ' + ', '.join(missing[:3]) if missing else 'shapes ' + '; '.join(wrong[:3])}); "
                          f"it was trained with other model.widths or datamodule.channels")
    backbone.load_state_dict({k: state[k] for k in own})


def _load_pretrained(net: nn.Module, name: str, pretrained) -> None:
    if pretrained in (None, False, "none"):
        return
    if pretrained in (True, "imagenet", "DEFAULT"):
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # offline: the hub cache is the only source
            raise ConfigError(
                f"model.pretrained={pretrained!r}: could not load ImageNet weights for {name} ({err}). Put the file "
                f"{Path(weights.url).name} into {torch.hub.get_dir()}/checkpoints/ or pass model.pretrained=<path to a "
                f"state dict>.") from err
    else:
        state = read_state_dict(pretrained, name)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith(("fc.", "classifier."))]:
        raise ConfigError(f"model.pretrained: weights do not fit {name}; missing {missing[:5]}...")


def torchvision_backbone(name: str, in_channels: int, pretrained=None) -> Backbone:
    net = getattr(torchvision.models, name)(weights=None)
    _load_pretrained(net, name, pretrained)
    if name.startswith("resnet"):
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = OrderedDict([("stem", stem), ("layer1", net.layer1), ("layer2", net.layer2),
                              ("layer3", net.layer3), ("layer4", net.layer4)])
        out = net.fc.in_features
    elif name.startswith("vgg"):
        feats = list(net.features.children())
        if in_channels != 3:
            feats[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        # One stage per VGG block (ending in a max-pool); the last pool is dropped, as ProtoPNet does not use it.
        stages, block, idx = OrderedDict(), [], 1
        for m in feats[:-1]:
            block.append(m)
            if isinstance(m, nn.MaxPool2d):
                stages[f"block{idx}"], block, idx = nn.Sequential(*block), [], idx + 1
        stages[f"block{idx}"] = nn.Sequential(*block)
        out = 512
    elif name == "densenet121":
        f = net.features
        if in_channels != 3:
            f.conv0 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        stages = OrderedDict([("stem", nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)),
                              ("block1", nn.Sequential(f.denseblock1, f.transition1)),
                              ("block2", nn.Sequential(f.denseblock2, f.transition2)),
                              ("block3", nn.Sequential(f.denseblock3, f.transition3)),
                              ("block4", nn.Sequential(f.denseblock4, f.norm5, nn.ReLU()))])
        out = f.norm5.num_features
    else:  # pragma: no cover - guarded by build_backbone
        raise ConfigError(name)
    return Backbone(stages, out)


def build_backbone(name: str, in_channels: int, image_size: int, pretrained=None, widths=None,
                   min_feature_size: int = 1) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)}")
    if name == "small":
        backbone = small_convnet(in_channels, image_size, tuple(widths) if widths else (16, 32, 64, 128))
        load_small_pretrained(backbone, pretrained)
    else:
        backbone = torchvision_backbone(name, in_channels, pretrained)
    h = feature_size(backbone, in_channels, image_size, name)
    if h < min_feature_size:
        raise ConfigError(f"datamodule.image_size={image_size} gives a {h}x{h} feature map with model.backbone={name}; "
                          f"this model needs at least {min_feature_size}x{min_feature_size}: raise "
                          f"datamodule.image_size or pick a backbone that downsamples less")
    return backbone


@torch.no_grad()
def feature_size(backbone: nn.Module, in_channels: int, image_size: int, name: str = "backbone") -> int:
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone(torch.zeros(1, in_channels, image_size, image_size))
    except RuntimeError as err:
        raise ConfigError(f"datamodule.image_size={image_size} is too small for model.backbone={name} ({err}); "
                          f"raise datamodule.image_size or use model.backbone=small") from err
    finally:
        backbone.train(was_training)
    return int(out.shape[-1])
