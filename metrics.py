"""Instance-segmentation scores for label maps: IoU matrix, DSB2018 score, precision/recall/F1, Dice,
and the scores of the other challenges (docs/predict.md works them through on examples):

- `semantic_dice`: the Dice challenge's score of one image, 2|X n Y| / (|X| + |Y|) on the
  foregrounds (labels > 0); 1 when both are empty. The challenge ranks by its mean over images.
- `f1_border`: the NeurIPS 2022 cell segmentation rule. Every object with a pixel in the outer
  `margin` (2) rows or columns of the image is removed from truth and prediction alike; the rest
  are paired one to one (an optimal assignment) where IoU >= 0.5; F1 = 2 TP / (n_true + n_pred).
- `instance_dice`: the AI-HERO time-lapse challenge's instance Dice. The pair with the highest Dice
  (above 0.1) is matched and both objects leave the pool, again and again; the image's score is
  the mean over matched pairs (their Dice), unmatched true objects and unmatched predicted objects
  (0 each).

A label map is an integer array (H, W): 0 is background, every other value is one object. Ids
need not be contiguous ({3, 17, 40} is fine) and the two maps being compared need not share ids.
No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

DSB_THRESHOLDS = np.arange(0.5, 1.0, 0.05)
SCORE_COLUMNS = ("dsb", "precision", "recall", "f1", "dice")
TABLE_COLUMNS = ("image_id", *SCORE_COLUMNS, "n_true", "n_pred")
# scores computed on request (valid.py --metric), appended to the table in this order
EXTRA_COLUMNS = ("f1_border", "instance_dice")
BORDER_MARGIN = 2          # NeurIPS 2022: objects within 2 pixels of the image edge are left out
INSTANCE_DICE_CUTOFF = 0.1  # AI-HERO: pairs with Dice at or below this are never matched


@dataclass(frozen=True)
class ImageScore:
    """Scores of one predicted label map against its truth.

    `thresholds`, `tp`, `fp`, `fn` run in parallel (one entry per IoU threshold). `dsb` is the mean
    over thresholds of tp / (tp + fp + fn); `precision`, `recall`, `f1` are taken at IoU > 0.5;
    `dice` is the semantic (foreground vs background) Dice. All scores lie in [0, 1].
    """
    thresholds: tuple[float, ...]
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    fn: tuple[int, ...]
    dsb: float
    precision: float
    recall: float
    f1: float
    dice: float
    n_true: int
    n_pred: int


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name}: expected a label map (H, W), got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"{name}: expected an integer label map, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name}: label ids must be >= 0 (0 is background)")
    return labels


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (n,), index int64 (H*W,)): index 0 for background, k + 1 for ids[k]."""
    values, inverse = np.unique(labels.ravel(), return_inverse=True)
    inverse = inverse.ravel()  # numpy 2.0.x returns it in the input's shape
    if values.size and values[0] == 0:
        return values[1:].astype(np.int64), inverse.astype(np.int64)
    # no background pixel at all: shift so that index 0 still means background
    return values.astype(np.int64), inverse.astype(np.int64) + 1


def overlaps(truth: np.ndarray, pred: np.ndarray):
    """Pixel counts of every true object, every predicted object and every pair.

    Returns (inter int64 (n_true, n_pred), true_area int64 (n_true,), pred_area int64 (n_pred,),
    true_ids int64 (n_true,), pred_ids int64 (n_pred,)), ids increasing.
    """
    truth = check_labels(truth, "truth")
    pred = check_labels(pred, "pred")
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} differs from pred shape {pred.shape}")
    true_ids, t_index = _compact(truth)
    pred_ids, p_index = _compact(pred)
    n_true, n_pred = true_ids.size, pred_ids.size
    true_area = np.bincount(t_index, minlength=n_true + 1)[1:]
    pred_area = np.bincount(p_index, minlength=n_pred + 1)[1:]
    # joint histogram over pixels that are foreground in both maps: one bincount, no pair loop
    both = (t_index > 0) & (p_index > 0)
    codes = (t_index[both] - 1) * n_pred + (p_index[both] - 1)
    inter = np.bincount(codes, minlength=n_true * n_pred).reshape(n_true, n_pred)
    return inter, true_area, pred_area, true_ids, pred_ids


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every true object with every predicted object.

    truth, pred: integer label maps of the same shape (H, W), 0 = background.
    Returns (iou float64 (n_true, n_pred) in [0, 1], true_ids int64 (n_true,), pred_ids int64
    (n_pred,)); ids are increasing, and row i / column j of `iou` belong to true_ids[i] / pred_ids[j].
    """
    inter, true_area, pred_area, true_ids, pred_ids = overlaps(truth, pred)
    union = true_area[:, None] + pred_area[None, :] - inter
    # every object has area >= 1, so union >= 1 wherever the matrix has an entry
    iou = inter / np.maximum(union, 1)
    return iou.astype(np.float64), true_ids, pred_ids


def _ratio(num: float, den: float, both_empty: bool) -> float:
    # a zero denominator only happens when an image has no object: perfect if neither has any
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def match(truth: np.ndarray, pred: np.ndarray, thresholds=DSB_THRESHOLDS) -> ImageScore:
    """Score `pred` against `truth` (integer label maps (H, W), 0 = background).

    At threshold t a true and a predicted object match when IoU > t (strictly). Objects within one
    label map do not overlap, so for t >= 0.5 each object has at most one partner with IoU > t
    and counting such pairs gives the matching; thresholds below 0.5 are refused for that reason.
    Thresholds are rounded to 10 decimals so that np.arange's drift (0.7000000000000002) does not
    decide whether an IoU of exactly 0.7 matches at 0.7: it never does.

    When both images are empty every score is 1.0; when exactly one is, dsb, precision, recall
    and f1 are 0.0.
    """
    thresholds = np.round(np.atleast_1d(np.asarray(thresholds, dtype=np.float64)), 10)
    if thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError("thresholds: expected a non-empty 1-D sequence")
    if not np.all(np.isfinite(thresholds)) or thresholds.min() < 0.5:
        raise ValueError("thresholds: every threshold must be a finite number >= 0.5 "
                         "(below 0.5 one object could match several)")
    iou, true_ids, pred_ids = iou_matrix(truth, pred)
    n_true, n_pred = int(true_ids.size), int(pred_ids.size)
    both_empty = n_true == 0 and n_pred == 0

    # (n_thresholds,) counts of pairs with IoU > t; sorting the IoUs makes this one searchsorted
    values = np.sort(iou[iou > 0.5], kind="stable")
    tp = values.size - np.searchsorted(values, thresholds, side="right")
    fp = n_pred - tp
    fn = n_true - tp
    dsb = float(np.mean([_ratio(a, a + b + c, both_empty) for a, b, c in zip(tp, fp, fn)]))

    tp50 = int(np.count_nonzero(iou > 0.5))
    precision = _ratio(tp50, n_pred, both_empty)
    recall = _ratio(tp50, n_true, both_empty)
    f1 = _ratio(2 * tp50, n_true + n_pred, both_empty)

    dice = semantic_dice(truth, pred)  # no foreground anywhere: the semantic masks agree (1.0)

    return ImageScore(
        thresholds=tuple(float(t) for t in thresholds),
        tp=tuple(int(v) for v in tp), fp=tuple(int(v) for v in fp), fn=tuple(int(v) for v in fn),
        dsb=dsb, precision=precision, recall=recall, f1=f1, dice=dice,
        n_true=n_true, n_pred=n_pred)


def semantic_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the foregrounds (labels > 0, or a mask's non-zero pixels) of two maps (H, W):
    2 |T n P| / (|T| + |P|), and 1.0 when neither has any foreground (the Dice challenge's rule)."""
    truth, pred = np.asarray(truth) != 0, np.asarray(pred) != 0
    if truth.shape != pred.shape or truth.ndim != 2:
        raise ValueError(f"expected two maps (H, W) of one shape, got {truth.shape} and {pred.shape}")
    return _ratio(2 * np.count_nonzero(truth & pred), np.count_nonzero(truth) + np.count_nonzero(pred),
                  both_empty=True)


def remove_border_objects(labels: np.ndarray, margin: int = BORDER_MARGIN) -> np.ndarray:
    """A copy of `labels` (H, W) with every object that has a pixel in the outer `margin` rows or
    columns set to background (the NeurIPS 2022 rule, margin 2); ids of the others are kept."""
    labels = check_labels(labels, "labels")
    band = np.ones(labels.shape, bool)
    band[margin:labels.shape[0] - margin, margin:labels.shape[1] - margin] = False
    touching = np.unique(labels[band])
    out = labels.copy()
    out[np.isin(labels, touching[touching != 0])] = 0
    return out


@dataclass(frozen=True)
class F1Score:
    """Counts and scores at one IoU threshold (pairs need IoU >= threshold), after border removal."""
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    n_true: int
    n_pred: int


def f1_border(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5,
              margin: int = BORDER_MARGIN) -> F1Score:
    """F1 of the NeurIPS 2022 cell segmentation challenge for one image.

    Objects touching the outer `margin` pixels are removed from both maps (`remove_border_objects`);
    the rest are paired one to one so that the number of pairs with IoU >= `threshold` is the
    largest possible (scipy's linear_sum_assignment; at IoU exactly 0.5 an object split in two
    halves could pair with either half, never both). TP = pairs, FP = n_pred - TP, FN = n_true - TP,
    F1 = 2 TP / (n_true + n_pred). No object left in either map gives 1.0 (the challenge's own
    script gives 0 there); objects in only one gives 0.0.
    """
    truth = remove_border_objects(truth, margin)
    pred = remove_border_objects(pred, margin)
    iou, true_ids, pred_ids = iou_matrix(truth, pred)
    n_true, n_pred = int(true_ids.size), int(pred_ids.size)
    hits = iou >= threshold
    tp = 0
    if hits.any():
        rows, cols = linear_sum_assignment(hits.astype(np.float64), maximize=True)
        tp = int(hits[rows, cols].sum())
    both_empty = n_true == 0 and n_pred == 0
    return F1Score(tp=tp, fp=n_pred - tp, fn=n_true - tp,
                   precision=_ratio(tp, n_pred, both_empty), recall=_ratio(tp, n_true, both_empty),
                   f1=_ratio(2 * tp, n_true + n_pred, both_empty), n_true=n_true, n_pred=n_pred)


def instance_dice(truth: np.ndarray, pred: np.ndarray, cutoff: float = INSTANCE_DICE_CUTOFF) -> float:
    """Instance Dice of the AI-HERO time-lapse challenge for one image.

    Dice of every pair, 2 |T n P| / (|T| + |P|). Greedily, the pair with the highest Dice above
    `cutoff` is matched and both objects leave the pool (ties: the lower true id, then the lower
    predicted id, first). The score is the sum of matched Dice over the number of entries: matched
    pairs, unmatched true objects and unmatched predicted objects, i.e. sum / (n_true + n_pred -
    n_matched). No object in either map gives 1.0 (the challenge's script, a mean over no entries,
    gives NaN there).
    """
    inter, true_area, pred_area, true_ids, pred_ids = overlaps(truth, pred)
    n_true, n_pred = int(true_ids.size), int(pred_ids.size)
    if n_true == 0 and n_pred == 0:
        return 1.0
    dice = 2 * inter / np.maximum(true_area[:, None] + pred_area[None, :], 1)
    rows, cols = np.nonzero(dice > cutoff)  # row-major: ties keep the lower ids first
    order = np.argsort(-dice[rows, cols], kind="stable")
    used_true, used_pred = np.zeros(n_true, bool), np.zeros(n_pred, bool)
    total, n_matched = 0.0, 0
    for i, j in zip(rows[order], cols[order]):
        if not used_true[i] and not used_pred[j]:
            used_true[i] = used_pred[j] = True
            total += float(dice[i, j])
            n_matched += 1
    return total / (n_true + n_pred - n_matched)


def extra_scores(truth: np.ndarray, pred: np.ndarray, names=EXTRA_COLUMNS) -> dict[str, float]:
    """The EXTRA_COLUMNS scores named in `names` for one image: {"f1_border": ..., "instance_dice": ...}."""
    unknown = set(names) - set(EXTRA_COLUMNS)
    if unknown:
        raise ValueError(f"unknown scores {sorted(unknown)}; known: {', '.join(EXTRA_COLUMNS)}")
    out = {}
    if "f1_border" in names:
        out["f1_border"] = f1_border(truth, pred).f1
    if "instance_dice" in names:
        out["instance_dice"] = instance_dice(truth, pred)
    return out


def score_table(scores: Mapping[str, ImageScore],
                extra: Mapping[str, Mapping[str, float]] | None = None) -> pd.DataFrame:
    """One row per image, in the mapping's order: image_id, dsb, precision, recall, f1, dice,
    n_true, n_pred, then the EXTRA_COLUMNS that `extra` ({image_id: {column: value}}, from
    `extra_scores`) holds for every image."""
    rows = [(str(image_id), s.dsb, s.precision, s.recall, s.f1, s.dice, s.n_true, s.n_pred)
            for image_id, s in scores.items()]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    # an empty table still gets numeric columns, so later arithmetic does not meet object dtype
    table = table.astype({c: float for c in SCORE_COLUMNS} | {"n_true": int, "n_pred": int})
    if extra:
        for column in EXTRA_COLUMNS:
            if all(column in extra.get(image_id, {}) for image_id in scores):
                table[column] = [float(extra[image_id][column]) for image_id in scores]
    return table


def mean_scores(scores: Mapping[str, ImageScore] | pd.DataFrame) -> dict[str, float]:
    """Mean over images of dsb, precision, recall, f1 and dice, and of the EXTRA_COLUMNS a table
    holds (each image weighs the same). Takes the dict given to `score_table` or its table; no
    image is a ValueError."""
    table = scores if isinstance(scores, pd.DataFrame) else score_table(scores)
    if len(table) == 0:
        raise ValueError("mean_scores: no images to average")
    columns = SCORE_COLUMNS + tuple(c for c in EXTRA_COLUMNS if c in table.columns)
    return {column: float(table[column].mean()) for column in columns}
