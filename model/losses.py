"""Losses on logits and a pixel IoU score.

Tensors are (B, 1, H, W): logits any float dtype; targets and weight maps float in [0, 1]
(targets) and >= 0 (weights). Losses are computed in float32, also under autocast, and return a
0-dim float32 tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from config import ConfigError, LossConfig

HEAD_INDEX = {"semantic": 0, "contour": 1, "marker": 2}  # position in [loss] head_weights


def _float32(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.float() for t in tensors]


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Jaccard index, per image, averaged over the batch.

    With p = sigmoid(logits) and w the weight map (1 when None), image b scores
    (sum w*p*t + smooth) / (sum w*(p + t - p*t) + smooth); `smooth` keeps an empty image with
    an empty prediction near a loss of 0 instead of 0/0.
    """
    with torch.autocast(logits.device.type, enabled=False):
        logits, target, weight = _float32(logits, target, weight)
        p = torch.sigmoid(logits)
        w = torch.ones_like(p) if weight is None else weight
        dims = tuple(range(1, p.ndim))
        inter = (w * p * target).sum(dims)
        union = (w * (p + target - p * target)).sum(dims)
        return (1 - (inter + smooth) / (union + smooth)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel focal loss, mean over all pixels of the batch.

    loss = w * a_t * (1 - p_t)**gamma * bce, with p_t = p*t + (1-p)*(1-t),
    a_t = alpha*t + (1-alpha)*(1-t) and bce = -log(p_t) for binary t (computed from the
    logits for stability). gamma = 0 and alpha = 0.5 give half the BCE.
    """
    with torch.autocast(logits.device.type, enabled=False):
        logits, target, weight = _float32(logits, target, weight)
        p = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = p * target + (1 - p) * (1 - target)
        alpha_t = alpha * target + (1 - alpha) * (1 - target)
        loss = alpha_t * (1 - p_t) ** gamma * bce
        return (loss if weight is None else weight * loss).mean()


def weighted_bce_loss(logits: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all pixels of w * binary cross-entropy (w = 1 when weight is None)."""
    with torch.autocast(logits.device.type, enabled=False):
        logits, target, weight = _float32(logits, target, weight)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (bce if weight is None else weight * bce).mean()


def multitask_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                   loss_cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the head losses of the model's heads (the keys of `outputs`).

    outputs: head name -> logits (B, 1, H, W). batch: 'semantic', 'contour', 'marker' targets
    and 'weight' map, float (B, 1, H, W); only the model's heads and, with loss_cfg.weight_map,
    'weight' are read. A head's loss is the sum of loss_cfg.terms (the weight map weighs every
    term) times its entry of loss_cfg.head_weights.
    Returns (total: 0-dim float32 with grad, {head name: its weighted loss, detached}).
    """
    if not loss_cfg.terms:
        raise ConfigError("[loss] terms: empty; choose at least one of iou, focal, bce")
    weight = None
    if loss_cfg.weight_map:
        if "weight" not in batch:
            raise ValueError("[loss] weight_map is on but the batch has no 'weight' map")
        weight = batch["weight"]
    total = None
    per_head = {}
    for name, logits in outputs.items():
        if name not in batch:
            raise ValueError(f"the batch has no {name!r} target for the model's {name} head")
        target = batch[name]
        if target.shape != logits.shape:
            raise ValueError(f"{name}: target shape {tuple(target.shape)} differs from the "
                             f"output shape {tuple(logits.shape)}")
        terms = {"iou": lambda: soft_iou_loss(logits, target, weight),
                 "focal": lambda: focal_loss(logits, target, loss_cfg.focal_gamma,
                                             loss_cfg.focal_alpha, weight),
                 "bce": lambda: weighted_bce_loss(logits, target, weight)}
        loss = loss_cfg.head_weights[HEAD_INDEX[name]] * sum(terms[t]() for t in loss_cfg.terms)
        per_head[name] = loss.detach()
        total = loss if total is None else total + loss
    return total, per_head


@torch.no_grad()
def iou_score(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Pixel IoU over the whole batch of (probs > threshold) against (target > 0.5).

    probs: probabilities in [0, 1] (not logits). Returns a float in [0, 1]; 1.0 when both the
    prediction and the target are empty.
    """
    pred = probs > threshold
    truth = target > 0.5
    union = (pred | truth).sum().item()
    return 1.0 if union == 0 else (pred & truth).sum().item() / union
