"""Classifiers that take pixels in [0, 1] and normalise internally.

Normalising inside the model keeps attacks, ε-balls and clipping in pixel space. Every model is
split into a `backbone` (shared with self-supervised tasks, whose heads live in `ssl_heads`) and a
linear classification `head`, so SSL pre-training can checkpoint and restore the backbone alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainables.config import ARCHS, ConfigError, closest
from trainables.data import DatasetInfo

_OWN_PREFIXES = ("backbone.", "normalize.")


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    def __init__(self, info: DatasetInfo, backbone: nn.Module, feature_dim: int, arch: str = ""):
        super().__init__()
        self.arch = arch
        self.info = info
        self.normalize = Normalize(info.mean, info.std)
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, info.num_classes)
        self.ssl_heads = nn.ModuleDict()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn(channels: int) -> tuple[nn.Module, int]:
    # Pooling after the first conv keeps the expensive 64- and 128-channel convs at 1/4 and 1/16
    # of the input area: adversarial training runs many passes per step on CPU.
    backbone = nn.Sequential(
        *_conv_bn_relu(channels, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        # 28px inputs end at 7x7 and 32px at 8x8; a fixed 4x4 grid keeps some spatial layout for
        # the dense layer while serving both.
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        # BatchNorm here roughly halves the steps needed to pass 80% on Fashion-MNIST. (It needs
        # more than one example per batch in train mode, like any batch statistic.)
        nn.Linear(128 * 4 * 4, 256, bias=False),
        nn.BatchNorm1d(256),
        nn.ReLU(inplace=True),
    )
    return backbone, 256


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016); also the block of Wide ResNets."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # A projection shortcut sees the activated input, as in the reference implementations.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActNet(nn.Module):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU and global average pooling."""

    def __init__(self, channels: int, stem: int, stages: list[tuple[int, int, int]]):
        super().__init__()
        self.stem = nn.Conv2d(channels, stem, 3, padding=1, bias=False)
        blocks, c_in = [], stem
        for c_out, n_blocks, stride in stages:
            for i in range(n_blocks):
                blocks.append(PreActBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def preact_resnet18(channels: int) -> tuple[nn.Module, int]:
    net = PreActNet(channels, 64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)])
    return net, net.out_channels


def wide_resnet(channels: int, depth: int, width: int) -> tuple[nn.Module, int]:
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ConfigError(f"wrn: depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), got {depth}")
    n = (depth - 4) // 6
    net = PreActNet(channels, 16, [(16 * width, n, 1), (32 * width, n, 2), (64 * width, n, 2)])
    return net, net.out_channels


def build_model(arch: str, info: DatasetInfo, depth: int = 40, width: int = 2) -> Classifier:
    """`depth` and `width` apply to `wrn` only."""
    if arch == "small_cnn":
        backbone, dim = small_cnn(info.channels)
    elif arch == "preact_resnet18":
        backbone, dim = preact_resnet18(info.channels)
    elif arch == "wrn":
        backbone, dim = wide_resnet(info.channels, depth, width)
    else:
        raise ConfigError(f"unknown arch '{arch}'{closest(str(arch), ARCHS)}; choose one of {', '.join(ARCHS)}")
    return Classifier(info, backbone, dim, arch=arch)


def backbone_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The normaliser and backbone weights (not the heads), detached copies on the CPU."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if k.startswith(_OWN_PREFIXES)
    }


def load_backbone(model: Classifier, state: dict[str, torch.Tensor]) -> None:
    """Load a `backbone_state` checkpoint; heads keep their current weights."""
    expected = {k for k in model.state_dict() if k.startswith(_OWN_PREFIXES)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"backbone checkpoint does not fit this {model.arch or 'model'}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}; "
            "pre-train with the same dataset, arch, depth and width"
        )
    own = model.state_dict()
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ConfigError(
            f"backbone checkpoint does not fit this {model.arch or 'model'}: shapes differ for "
            f"{sorted(wrong)[:3]}; pre-train with the same dataset, arch, depth and width"
        )
    model.load_state_dict(state, strict=False)
