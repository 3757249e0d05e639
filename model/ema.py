"""An exponential moving average of a model's weights (`[train] ema_decay`), on PyTorch's
`torch.optim.swa_utils.AveragedModel`: parameters and buffers (batch-norm statistics) alike."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones: `decay`, but no more than
    (1 + n) / (10 + n), so that the first steps, far from where training ends, fade out fast."""
    return min(decay, (1 + updates) / (10 + updates))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of `model` whose weights follow `model`'s as an exponential moving average; call
    `update_parameters(model)` after each optimizer step (the first call copies the weights)."""

    @torch.no_grad()
    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = ema_decay_at(decay, int(n_averaged))
        for a, c in zip(averaged, current):
            if torch.is_floating_point(a):
                a.lerp_(c, 1 - d)
            else:  # integer buffers (batch norm's num_batches_tracked) follow the model
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)
