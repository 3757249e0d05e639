"""Models (U-Net family with interchangeable encoders) and their losses."""
from __future__ import annotations

from torch import nn

from config import ModelConfig
from model.losses import (focal_loss, iou_score, multitask_loss, soft_iou_loss,
                          weighted_bce_loss)
from model.unet import UNet


def build_model(model_cfg: ModelConfig) -> UNet:
    """The network that `model_cfg` describes (raises ConfigError for bad settings)."""
    return UNet(model_cfg)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of `module` (only those with requires_grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["build_model", "count_parameters", "UNet", "soft_iou_loss", "focal_loss",
           "weighted_bce_loss", "multitask_loss", "iou_score"]
