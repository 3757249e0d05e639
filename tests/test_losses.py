"""Losses against values worked out by hand on a 1x1x2x2 example.

logits [[0, ln 3], [-ln 3, 0]] give p = [[1/2, 3/4], [1/4, 1/2]]; target [[1, 1], [0, 0]];
so per-pixel BCE = [[ln 2, ln 4/3], [ln 4/3, ln 2]] and p_t = [[1/2, 3/4], [3/4, 1/2]].
"""
import math

import pytest
import torch

from config import ConfigError, load_config
from model import focal_loss, iou_score, multitask_loss, soft_iou_loss, weighted_bce_loss

LN2, LN43 = math.log(2), math.log(4 / 3)
LOGITS = torch.tensor([[[[0.0, math.log(3)], [-math.log(3), 0.0]]]])
TARGET = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
WEIGHT = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
BASE = load_config(user_path=None)


def close(value, expected):
    return value.dtype == torch.float32 and value.ndim == 0 and \
        math.isclose(value.item(), expected, rel_tol=1e-6, abs_tol=1e-7)


def test_weighted_bce():
    assert close(weighted_bce_loss(LOGITS, TARGET), (2 * LN2 + 2 * LN43) / 4)
    assert close(weighted_bce_loss(LOGITS, TARGET, WEIGHT), (LN2 + 2 * LN43 + 3 * LN43) / 4)


def test_focal_gamma_and_alpha():
    # gamma 2, alpha 1/4: alpha_t = [[1/4, 1/4], [3/4, 3/4]],
    # (1 - p_t)^2 = [[1/4, 1/16], [1/16, 1/4]]
    expected = (LN2 / 16 + LN43 / 64 + 3 * LN43 / 64 + 3 * LN2 / 16) / 4
    assert close(focal_loss(LOGITS, TARGET, gamma=2.0, alpha=0.25), expected)
    weighted = (LN2 / 16 + 2 * LN43 / 64 + 3 * 3 * LN43 / 64) / 4
    assert close(focal_loss(LOGITS, TARGET, 2.0, 0.25, WEIGHT), weighted)
    # gamma 0 and alpha 1/2: half the BCE; alpha 1: only the positive pixels count
    assert close(focal_loss(LOGITS, TARGET, 0.0, 0.5), (2 * LN2 + 2 * LN43) / 8)
    assert close(focal_loss(LOGITS, TARGET, 0.0, 1.0), (LN2 + LN43) / 4)
    # a larger gamma shrinks the loss of well classified pixels
    assert focal_loss(LOGITS, TARGET, 3.0, 0.5) < focal_loss(LOGITS, TARGET, 1.0, 0.5)


def test_soft_iou():
    # intersection 1/2 + 3/4 = 5/4; union = sum p + sum t - intersection = 2 + 2 - 5/4 = 11/4
    assert close(soft_iou_loss(LOGITS, TARGET, smooth=0.0), 1 - (5 / 4) / (11 / 4))
    assert close(soft_iou_loss(LOGITS, TARGET), 1 - (5 / 4 + 1) / (11 / 4 + 1))
    # weighted: intersection 1/2 + 2 * 3/4 = 2; union 1 + 2 + 3 * 1/4 + 0 = 15/4
    assert close(soft_iou_loss(LOGITS, TARGET, WEIGHT), 1 - 3 / (15 / 4 + 1))


def test_soft_iou_is_a_mean_over_images():
    # second image: empty target, p = 1/2 everywhere: intersection 0, union 2
    logits = torch.cat([LOGITS, torch.zeros_like(LOGITS)])
    target = torch.cat([TARGET, torch.zeros_like(TARGET)])
    assert close(soft_iou_loss(logits, target), (0.4 + (1 - 1 / 3)) / 2)


def test_losses_are_float32_under_autocast():
    logits = LOGITS.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = weighted_bce_loss(logits, TARGET)
    assert value.dtype == torch.float32
    assert math.isclose(value.item(), weighted_bce_loss(logits.float(), TARGET).item())


def outputs_and_batch():
    outputs = {"semantic": LOGITS.clone().requires_grad_(),
               "contour": torch.zeros(1, 1, 2, 2, requires_grad=True),
               "marker": torch.full((1, 1, 2, 2), -math.log(3), requires_grad=True)}
    batch = {"semantic": TARGET, "contour": TARGET, "marker": 1 - TARGET, "weight": WEIGHT}
    return outputs, batch


def test_multitask_sums_heads_with_weights():
    outputs, batch = outputs_and_batch()
    cfg = BASE.replace("loss", weight_map=False, terms=("bce",), head_weights=(1.0, 2.0, 3.0)).loss
    total, per_head = multitask_loss(outputs, batch, cfg)
    semantic = (2 * LN2 + 2 * LN43) / 4
    contour = LN2  # p = 1/2 everywhere
    marker = (2 * math.log(4 / 3) + 2 * math.log(4)) / 4  # p = 1/4; target [[0, 0], [1, 1]]
    assert close(total, semantic + 2 * contour + 3 * marker)
    assert close(per_head["contour"], 2 * contour) and close(per_head["marker"], 3 * marker)
    assert not per_head["semantic"].requires_grad
    total.backward()
    assert all(o.grad is not None for o in outputs.values())


def test_multitask_only_the_models_heads_and_weight_map():
    outputs, batch = outputs_and_batch()
    del batch["marker"], batch["contour"]  # a unet batch needs only its own target
    cfg = BASE.replace("loss", weight_map=True, terms=("iou", "focal", "bce"),
                       head_weights=(0.5, 2.0, 3.0), focal_gamma=2.0, focal_alpha=0.25).loss
    total, per_head = multitask_loss({"semantic": outputs["semantic"]}, batch, cfg)
    expected = 0.5 * (soft_iou_loss(LOGITS, TARGET, WEIGHT).item()
                      + focal_loss(LOGITS, TARGET, 2.0, 0.25, WEIGHT).item()
                      + weighted_bce_loss(LOGITS, TARGET, WEIGHT).item())
    assert list(per_head) == ["semantic"]
    assert close(total, expected)
    with pytest.raises(ValueError, match="contour"):
        multitask_loss({"contour": outputs["contour"]}, batch, cfg)


def test_multitask_needs_a_term():
    outputs, batch = outputs_and_batch()
    cfg = BASE.replace("loss", terms=()).loss
    with pytest.raises(ConfigError, match=r"\[loss\] terms"):
        multitask_loss(outputs, batch, cfg)


def test_iou_score():
    probs = torch.tensor([[[[0.6, 0.4], [0.7, 0.1]]]])
    assert iou_score(probs, TARGET) == pytest.approx(1 / 3)  # intersection 1, union 3
    assert iou_score(probs, TARGET, threshold=0.35) == pytest.approx(2 / 3)
    assert iou_score(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)) == 1.0
    assert iou_score(probs, torch.zeros(1, 1, 2, 2)) == 0.0
