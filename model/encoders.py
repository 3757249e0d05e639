"""Encoders of the U-Net family: a plain U-Net encoder and torchvision backbones.

Every encoder is cut into stages. Stage i maps the output of stage i-1 (stage 0: the normalised
image) to a feature map with `channels[i]` channels at `strides[i]` times coarser resolution;
the decoder uses every stage output but the last as a skip connection. Stage 0 always works at
stride 1: torchvision backbones start with a stride-2 stem, so for them stage 0 is the identity
and hands the normalised image itself to the decoder's last level, which keeps full-resolution
detail (thin contours) available there.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import (DenseNet121_Weights, ResNet18_Weights, ResNet34_Weights,
                                ResNet101_Weights, VGG16_BN_Weights, WeightsEnum)

from config import ConfigError, ModelConfig
from model.blocks import ConvBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PlainEncoder(nn.Sequential):
    """Classic U-Net encoder: 5 levels of two conv blocks, 2x2 max pooling between levels.

    Level i has n_filter * 2**i channels at stride 2**i, so the network stride is 16.
    """

    def __init__(self, n_filter: int, order: str):
        widths = [n_filter * 2 ** i for i in range(5)]
        levels = [ConvBlock(3, widths[0], order)]
        for low, high in zip(widths, widths[1:]):
            levels.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(low, high, order)))
        super().__init__(*levels)


def _resnet_stages(net: nn.Module) -> list[nn.Module]:
    return [nn.Identity(), nn.Sequential(net.conv1, net.bn1, net.relu),
            nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4]


def _vgg_stages(net: nn.Module) -> list[nn.Module]:
    # Cut before each max pooling; the fifth pooling is left out because no conv follows it,
    # so VGG's network stride is 16.
    f = net.features
    return [f[0:6], f[6:13], f[13:23], f[23:33], f[33:43]]


def _densenet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [nn.Identity(), nn.Sequential(f.conv0, f.norm0, f.relu0),
            nn.Sequential(f.pool0, f.denseblock1), nn.Sequential(f.transition1, f.denseblock2),
            nn.Sequential(f.transition2, f.denseblock3),
            # torchvision applies ReLU after norm5 in its own forward, not as a module
            nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU())]


# The published DenseNet files use the old key names 'denselayer1.norm.1.weight';
# torchvision's modules are now called 'norm1', 'relu1', 'conv1', ...
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")


def _densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_OLD_DENSENET_KEY.sub(r"\1\2.\3", k): v for k, v in state.items()}


def _plain_builder(n_filter: int, order: str) -> nn.Module:
    return PlainEncoder(n_filter, order)


def _torchvision_builder(constructor: Callable[..., nn.Module]) -> Callable[[int, str], nn.Module]:
    # n_filter and conv_order shape only the plain encoder; torchvision fixes its own layers.
    def build(n_filter: int, order: str) -> nn.Module:
        return constructor(weights=None)
    return build


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder.

    builder(n_filter, conv_order): backbone with random weights.
    stages(backbone): the list of stage modules cut from it.
    channels, strides: output channels and stride of each stage (with per_filter, channels are
        multiples of n_filter).
    weights: torchvision ImageNet weights (None: no pretrained weights exist).
    mean, std: per-channel RGB normalisation of a [0, 1] image that the encoder expects.
    classifier: key prefix of the backbone's classification head, which a weights file may omit.
    fix_keys: renames the keys of a weights file to the backbone's names (None: no renaming).
    """
    builder: Callable[[int, str], nn.Module]
    stages: Callable[[nn.Module], list[nn.Module]]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    weights: WeightsEnum | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier: str = ""
    fix_keys: Callable[[dict], dict] | None = None
    per_filter: bool = False

    def widths(self, n_filter: int) -> tuple[int, ...]:
        """Output channels of each stage."""
        return tuple(c * n_filter for c in self.channels) if self.per_filter else self.channels


_RESNET_STRIDES = (1, 2, 4, 8, 16, 32)

ENCODERS: dict[str, EncoderSpec] = {
    # Mean and std 0.5 map the [0, 1] image to [-1, 1] for the randomly initialised plain U-Net.
    "plain": EncoderSpec(_plain_builder, lambda net: list(net.children()), (1, 2, 4, 8, 16),
                         (1, 2, 4, 8, 16), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), per_filter=True),
    "resnet18": EncoderSpec(_torchvision_builder(torchvision.models.resnet18), _resnet_stages,
                            (3, 64, 64, 128, 256, 512), _RESNET_STRIDES,
                            ResNet18_Weights.IMAGENET1K_V1, IMAGENET_MEAN, IMAGENET_STD, "fc."),
    "resnet34": EncoderSpec(_torchvision_builder(torchvision.models.resnet34), _resnet_stages,
                            (3, 64, 64, 128, 256, 512), _RESNET_STRIDES,
                            ResNet34_Weights.IMAGENET1K_V1, IMAGENET_MEAN, IMAGENET_STD, "fc."),
    "resnet101": EncoderSpec(_torchvision_builder(torchvision.models.resnet101), _resnet_stages,
                             (3, 64, 256, 512, 1024, 2048), _RESNET_STRIDES,
                             ResNet101_Weights.IMAGENET1K_V1, IMAGENET_MEAN, IMAGENET_STD, "fc."),
    "vgg16_bn": EncoderSpec(_torchvision_builder(torchvision.models.vgg16_bn), _vgg_stages,
                            (64, 128, 256, 512, 512), (1, 2, 4, 8, 16),
                            VGG16_BN_Weights.IMAGENET1K_V1, IMAGENET_MEAN, IMAGENET_STD,
                            "classifier."),
    "densenet121": EncoderSpec(_torchvision_builder(torchvision.models.densenet121),
                               _densenet_stages, (3, 64, 256, 512, 1024, 1024), _RESNET_STRIDES,
                               DenseNet121_Weights.IMAGENET1K_V1, IMAGENET_MEAN, IMAGENET_STD,
                               "classifier.", _densenet_keys),
}


class Encoder(nn.Module):
    """Runs the stages in turn.

    forward(x): x (B, 3, H, W) float, already normalised -> list of feature maps, entry i of
    shape (B, channels[i], H / strides[i], W / strides[i]), in the dtype of the computation.
    """

    def __init__(self, stages: list[nn.Module], channels: tuple[int, ...],
                 strides: tuple[int, ...]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.strides = strides

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def get_spec(name: str) -> EncoderSpec:
    """The registry entry of encoder `name`; ConfigError for an unknown name."""
    if name not in ENCODERS:
        raise ConfigError(f"[model] encoder: unknown encoder {name!r} "
                          f"(valid: {', '.join(ENCODERS)})")
    return ENCODERS[name]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_weights_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConfigError(f"[model] weights_path: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"[model] weights_path: cannot read {path} as a state_dict "
                          f"({_one_line(exc)})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"[model] weights_path: {path} holds a {type(state).__name__}, "
                          f"not a state_dict")
    return state


def _download_weights(name: str, weights: WeightsEnum) -> dict[str, torch.Tensor]:
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        # Uses the file in cache_dir when it is there, so offline machines work once it is copied.
        return torch.hub.load_state_dict_from_url(weights.url, model_dir=cache_dir,
                                                  map_location="cpu", progress=False,
                                                  check_hash=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        file_name = os.path.basename(urlparse(weights.url).path)
        raise ConfigError(f"[model] pretrained: cannot get ImageNet weights for {name} "
                          f"({_one_line(exc)}); download {weights.url} and set weights_path to "
                          f"it, or put it at {os.path.join(cache_dir, file_name)}") from None


def _load_into(backbone: nn.Module, state: dict[str, torch.Tensor], spec: EncoderSpec,
               key: str, source: str) -> None:
    if spec.fix_keys is not None:
        state = spec.fix_keys(state)
    own = backbone.state_dict()
    problems = {
        "unexpected": [k for k in state if k not in own],
        "wrong shape": [k for k in state if k in own and getattr(state[k], "shape", None)
                        != own[k].shape],
    }
    if not any(problems.values()):
        # Loaded by torch rather than compared here, because batch norms accept files from
        # before num_batches_tracked existed (torchvision's DenseNet and VGG files).
        result = backbone.load_state_dict(state, strict=False)
        # The classification head is dropped from the encoder, so a file may omit it.
        problems["missing"] = [k for k in result.missing_keys
                               if not (spec.classifier and k.startswith(spec.classifier))]
    if any(problems.values()):
        detail = "; ".join(f"{what} keys: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                           for what, keys in problems.items() if keys)
        raise ConfigError(f"[model] {key}: {source} does not fit the encoder ({detail})")


def build_encoder(cfg: ModelConfig) -> tuple[Encoder, EncoderSpec]:
    """Build the encoder named by cfg.encoder, with weights as cfg.pretrained / weights_path say.

    weights_path (a local state_dict of the whole torchvision model, classifier optional)
    replaces the download; both need pretrained = True.
    """
    spec = get_spec(cfg.encoder)
    if cfg.pretrained and spec.weights is None:
        raise ConfigError(f"[model] pretrained: encoder {cfg.encoder!r} has no pretrained "
                          f"weights; set pretrained = False or choose a torchvision encoder")
    if cfg.weights_path and not cfg.pretrained:
        raise ConfigError("[model] weights_path: set while pretrained = False; set pretrained = "
                          "True to load it, or leave weights_path empty")
    backbone = spec.builder(cfg.n_filter, cfg.conv_order)
    if cfg.weights_path:
        _load_into(backbone, _read_weights_file(cfg.weights_path), spec, "weights_path",
                   cfg.weights_path)
    elif cfg.pretrained:
        _load_into(backbone, _download_weights(cfg.encoder, spec.weights), spec,
                   "pretrained", f"the {cfg.encoder} ImageNet weights file")
    encoder = Encoder(spec.stages(backbone), spec.widths(cfg.n_filter), spec.strides)
    return encoder, spec
