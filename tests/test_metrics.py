"""Scores against hand-computed values and a brute-force double loop."""
import numpy as np
import pandas as pd
import pytest

from metrics import (DSB_THRESHOLDS, ImageScore, extra_scores, f1_border, instance_dice, iou_matrix, match,
                     mean_scores, remove_border_objects, score_table, semantic_dice)
from tests.conftest import disk

SHAPE = (40, 50)


def square(top, left, size=10, shape=SHAPE):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def labels_of(*masks, ids=None, shape=SHAPE):
    """Label map from masks painted in order (later masks win), mask k getting ids[k]."""
    labels = np.zeros(shape, np.int32)
    for mask, label_id in zip(masks, ids or range(1, len(masks) + 1)):
        labels[mask] = label_id
    return labels


def pair_with_overlap(inter, extra_true, extra_pred):
    """One true and one predicted object on a row strip with the given pixel counts: `inter`
    shared pixels, `extra_true` only in truth, `extra_pred` only in the prediction."""
    shape = (1, inter + extra_true + extra_pred)
    truth = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    truth[0, :extra_true + inter] = 1
    pred[0, extra_true:] = 1
    return truth, pred


# --- hand-computed values ---------------------------------------------------------------------

def test_squares_shifted_by_two_pixels():
    truth = labels_of(square(5, 5))
    pred = labels_of(square(5, 7))
    iou, true_ids, pred_ids = iou_matrix(truth, pred)
    assert iou.shape == (1, 1) and iou.dtype == np.float64
    assert iou[0, 0] == pytest.approx(80 / 120)
    score = match(truth, pred)
    # 0.667 > 0.50, 0.55, 0.60, 0.65 only
    assert score.tp == (1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
    assert score.fp == (0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    assert score.fn == score.fp
    assert score.dsb == pytest.approx(0.4)
    assert score.precision == score.recall == score.f1 == 1.0
    assert score.dice == pytest.approx(2 * 80 / 200)
    assert (score.n_true, score.n_pred) == (1, 1)


def test_shifted_disks():
    a, b = disk(SHAPE, (20, 20), 8), disk(SHAPE, (20, 24), 8)
    inter, union = np.count_nonzero(a & b), np.count_nonzero(a | b)
    iou = inter / union  # about 0.51: matched at 0.50 only
    assert 0.5 < iou < 0.55
    score = match(labels_of(a), labels_of(b))
    assert score.tp == (1,) + (0,) * 9
    assert score.dsb == pytest.approx(0.1)
    assert score.dice == pytest.approx(2 * inter / (a.sum() + b.sum()))


@pytest.mark.parametrize("inter, extra_true, extra_pred, n_matched", [
    (8, 4, 4, 0),    # IoU 8/16 = 0.5 exactly: not a match, not even at 0.5
    (11, 9, 0, 1),   # 0.55 exactly: matched at 0.50 only
    (3, 2, 0, 2),    # 0.6
    (7, 3, 0, 4),    # 0.7: np.arange gives 0.7000000000000002, rounding must not matter
    (3, 0, 1, 5),    # 0.75
    (17, 3, 0, 7),   # 0.85
    (19, 0, 1, 9),   # 0.95
    (20, 0, 0, 10),  # 1.0
])
def test_iou_equal_to_threshold_is_not_a_match(inter, extra_true, extra_pred, n_matched):
    truth, pred = pair_with_overlap(inter, extra_true, extra_pred)
    score = match(truth, pred)
    assert sum(score.tp) == n_matched
    assert score.dsb == pytest.approx(n_matched / 10)


def test_iou_exactly_half_scores_zero_at_half():
    truth = np.zeros((4, 4), np.int32)
    pred = np.zeros((4, 4), np.int32)
    truth[:, 0:3] = 5   # 12 pixels
    pred[:, 1:4] = 9    # 12 pixels, 8 shared: IoU = 8 / 16
    assert iou_matrix(truth, pred)[0][0, 0] == 0.5
    score = match(truth, pred, thresholds=[0.5])
    assert score.tp == (0,) and score.fp == (1,) and score.fn == (1,)
    assert score.dsb == 0.0 and score.precision == 0.0 and score.recall == 0.0 and score.f1 == 0.0


def test_non_contiguous_ids():
    truth = labels_of(square(0, 0), square(0, 20), square(20, 0), ids=[40, 3, 17])
    pred = labels_of(square(20, 0), square(0, 22), square(25, 30), ids=[1000, 5, 2])
    iou, true_ids, pred_ids = iou_matrix(truth, pred)
    assert true_ids.tolist() == [3, 17, 40]
    assert pred_ids.tolist() == [2, 5, 1000]
    expected = np.zeros((3, 3))
    expected[0, 1] = 80 / 120    # true 3 vs pred 5: shifted by 2
    expected[1, 2] = 1.0         # true 17 vs pred 1000: same square
    assert np.allclose(iou, expected)
    score = match(truth, pred)
    assert score.tp[0] == 2 and score.fp[0] == 1 and score.fn[0] == 1
    assert score.precision == pytest.approx(2 / 3)
    assert score.recall == pytest.approx(2 / 3)
    assert score.f1 == pytest.approx(2 / 3)
    # per threshold: 2 matches up to 0.65, then only the perfect one
    expected_dsb = (4 * (2 / 4) + 6 * (1 / 5)) / 10
    assert score.dsb == pytest.approx(expected_dsb)


def test_precision_recall_differ():
    truth = labels_of(square(0, 0), square(0, 20), square(20, 0), square(20, 20))
    pred = labels_of(square(0, 0), square(0, 21))
    score = match(truth, pred)
    assert (score.n_true, score.n_pred) == (4, 2)
    assert score.precision == 1.0
    assert score.recall == 0.5
    assert score.f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert score.dice == pytest.approx(2 * (100 + 90) / (400 + 200))


def test_dice_ignores_instances():
    # one true object split in two predicted halves: poor instance scores, perfect Dice
    truth = labels_of(square(0, 0))
    pred = np.zeros(SHAPE, np.int32)
    pred[0:10, 0:5], pred[0:10, 5:10] = 1, 2
    score = match(truth, pred)
    assert score.dice == 1.0
    assert score.dsb == 0.0 and score.precision == 0.0


# --- empty images -----------------------------------------------------------------------------

def test_both_empty():
    empty = np.zeros(SHAPE, np.int32)
    iou, true_ids, pred_ids = iou_matrix(empty, empty)
    assert iou.shape == (0, 0) and true_ids.size == 0 and pred_ids.size == 0
    score = match(empty, empty)
    assert score.dsb == score.precision == score.recall == score.f1 == score.dice == 1.0
    assert score.tp == (0,) * 10 and (score.n_true, score.n_pred) == (0, 0)


@pytest.mark.parametrize("truth_empty", [True, False])
def test_one_empty(truth_empty):
    empty, full = np.zeros(SHAPE, np.int32), labels_of(square(0, 0), square(20, 20))
    truth, pred = (empty, full) if truth_empty else (full, empty)
    iou, _, _ = iou_matrix(truth, pred)
    assert iou.shape == ((0, 2) if truth_empty else (2, 0))
    score = match(truth, pred)
    assert score.dsb == score.precision == score.recall == score.f1 == score.dice == 0.0
    assert score.fp[0] == (2 if truth_empty else 0)
    assert score.fn[0] == (0 if truth_empty else 2)


def test_no_background_pixel():
    truth = np.full((4, 4), 7, np.int32)
    pred = np.full((4, 4), 2, np.int32)
    iou, true_ids, pred_ids = iou_matrix(truth, pred)
    assert iou.tolist() == [[1.0]] and true_ids.tolist() == [7] and pred_ids.tolist() == [2]
    assert match(truth, pred).dsb == 1.0


# --- bad input --------------------------------------------------------------------------------

def test_bad_input():
    a = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="differs"):
        iou_matrix(a, np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match="integer"):
        iou_matrix(a, a.astype(float))
    with pytest.raises(ValueError, match=">= 0"):
        iou_matrix(a - 1, a)
    with pytest.raises(ValueError, match="0.5"):
        match(a, a, thresholds=[0.3, 0.5])
    with pytest.raises(ValueError, match="non-empty"):
        match(a, a, thresholds=[])


# --- brute force ------------------------------------------------------------------------------

def brute_force(truth, pred, thresholds):
    """Double loop over object pairs, with an explicit one-to-one matching at each threshold."""
    true_ids = [i for i in np.unique(truth) if i != 0]
    pred_ids = [j for j in np.unique(pred) if j != 0]
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            t, p = truth == i, pred == j
            iou[a, b] = (t & p).sum() / (t | p).sum()
    tps = []
    for threshold in thresholds:
        used_pred = set()
        tp = 0
        for a in range(len(true_ids)):
            for b in range(len(pred_ids)):
                if iou[a, b] > threshold and b not in used_pred:
                    used_pred.add(b)
                    tp += 1
                    break
        tps.append(tp)
    n_t, n_p = len(true_ids), len(pred_ids)
    ratios = [tp / (tp + (n_p - tp) + (n_t - tp)) if n_t + n_p else 1.0 for tp in tps]
    return iou, tps, float(np.mean(ratios))


def random_labels(rng, centres, radii, shape):
    """Overlapping disks painted in random order, with random large non-contiguous ids."""
    labels = np.zeros(shape, np.int64)
    ids = rng.choice(np.arange(1, 10_000), size=len(centres), replace=False)
    for k in rng.permutation(len(centres)):
        labels[disk(shape, centres[k], radii[k])] = ids[k]
    return labels


def test_agrees_with_brute_force():
    rng = np.random.default_rng(42)
    shape = (48, 56)
    thresholds = np.round(DSB_THRESHOLDS, 10)
    for _ in range(20):
        n = int(rng.integers(0, 9))
        centres = rng.integers(0, shape, size=(n, 2))
        radii = rng.integers(2, 9, size=n)
        truth = random_labels(rng, centres, radii, shape)
        # the prediction: jittered copies of some true disks, plus a few strays
        keep = rng.random(n) < 0.8
        extra = int(rng.integers(0, 3))
        p_centres = np.concatenate([centres[keep] + rng.integers(-2, 3, size=(keep.sum(), 2)),
                                    rng.integers(0, shape, size=(extra, 2))])
        p_radii = np.concatenate([radii[keep] + rng.integers(-1, 2, size=keep.sum()),
                                  rng.integers(2, 9, size=extra)])
        pred = random_labels(rng, p_centres, np.maximum(p_radii, 1), shape)

        iou, true_ids, pred_ids = iou_matrix(truth, pred)
        ref_iou, ref_tp, ref_dsb = brute_force(truth, pred, thresholds)
        assert np.allclose(iou, ref_iou)
        assert true_ids.tolist() == sorted(set(truth.ravel()) - {0})
        assert pred_ids.tolist() == sorted(set(pred.ravel()) - {0})
        score = match(truth, pred)
        assert list(score.tp) == ref_tp
        assert score.dsb == pytest.approx(ref_dsb)
        n_t, n_p = len(true_ids), len(pred_ids)
        assert list(score.fp) == [n_p - tp for tp in ref_tp]
        assert list(score.fn) == [n_t - tp for tp in ref_tp]
        if n_p:
            assert score.precision == pytest.approx(ref_tp[0] / n_p)
        if n_t:
            assert score.recall == pytest.approx(ref_tp[0] / n_t)


# --- tables -----------------------------------------------------------------------------------

def test_score_table_and_means():
    empty = np.zeros(SHAPE, np.int32)
    scores = {"shifted": match(labels_of(square(5, 5)), labels_of(square(5, 7))),
              "both_empty": match(empty, empty),
              "missed": match(labels_of(square(0, 0)), empty)}
    table = score_table(scores)
    assert list(table.columns) == ["image_id", "dsb", "precision", "recall", "f1", "dice",
                                   "n_true", "n_pred"]
    assert table["image_id"].tolist() == ["shifted", "both_empty", "missed"]
    assert table["dsb"].tolist() == pytest.approx([0.4, 1.0, 0.0])
    assert table["n_true"].tolist() == [1, 0, 1]
    means = mean_scores(scores)
    assert set(means) == {"dsb", "precision", "recall", "f1", "dice"}
    assert means["dsb"] == pytest.approx(1.4 / 3)
    assert means["precision"] == pytest.approx(2 / 3)
    assert means["dice"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert mean_scores(table) == means


def test_empty_table():
    table = score_table({})
    assert len(table) == 0 and table["dsb"].dtype == float
    with pytest.raises(ValueError, match="no images"):
        mean_scores({})


def test_image_score_is_frozen():
    score = match(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32))
    assert isinstance(score, ImageScore)
    with pytest.raises(Exception):
        score.dsb = 0.5
    assert isinstance(score_table({"x": score}), pd.DataFrame)


# --- the other challenges' scores, on hand-made cases ------------------------------------------

def strip(*spans, width=50):
    """A one-row label map: span k = (first, last) column, inclusive, gets id k + 1."""
    labels = np.zeros((1, width), np.int32)
    for k, (first, last) in enumerate(spans, start=1):
        labels[0, first:last + 1] = k
    return labels


def test_semantic_dice_exact():
    assert semantic_dice(labels_of(square(5, 5)), labels_of(square(5, 7))) == pytest.approx(0.8)  # 2*80/200
    empty = np.zeros(SHAPE, np.int32)
    assert semantic_dice(empty, empty) == 1.0
    assert semantic_dice(empty, labels_of(square(0, 0))) == 0.0
    # instances do not matter: one true object predicted as two halves is a perfect semantic mask
    halves = labels_of(square(5, 5, 10), square(5, 10, 5)).astype(np.uint16)
    assert semantic_dice(labels_of(square(5, 5)), halves) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        semantic_dice(empty, empty[:, :3])


def test_remove_border_objects_keeps_ids_of_the_rest():
    labels = np.zeros((10, 10), np.int32)
    labels[0, 4] = 3      # on the edge
    labels[8, 5] = 4      # in the second-to-last row: inside the 2-pixel band
    labels[4:6, 2:4] = 7  # column 2 is the first one outside the band
    labels[5, 6] = 9      # inside the band of margin 3 too (columns 3..6)
    kept = remove_border_objects(labels)
    assert sorted(np.unique(kept)) == [0, 7, 9] and (kept[labels == 7] == 7).all()
    assert sorted(np.unique(remove_border_objects(labels, margin=3))) == [0, 9]


def border_case():
    """20x20: truth A, B (top edge), C (column 18), E; prediction A, B, D (a false positive) and E
    widened into column 1."""
    truth = np.zeros((20, 20), np.int32)
    truth[5:10, 5:10] = 1     # A, inside
    truth[0:4, 10:14] = 2     # B touches row 0
    truth[12:16, 16:19] = 3   # C reaches column 18, in the band
    truth[10:15, 2:7] = 4     # E, inside (columns 2..6)
    pred = np.zeros((20, 20), np.int32)
    pred[5:10, 5:10] = 11     # A exactly
    pred[0:4, 10:14] = 12     # B exactly
    pred[15:18, 8:11] = 13    # D, inside, matches nothing
    pred[10:15, 1:7] = 14     # E widened to column 1: IoU 25/30, but in the band
    return truth, pred


def test_f1_border_leaves_out_objects_touching_the_border():
    truth, pred = border_case()
    score = f1_border(truth, pred)
    # truth keeps A, E; prediction keeps A, D: one pair (A), E is missed, D is a false positive
    assert (score.n_true, score.n_pred, score.tp, score.fp, score.fn) == (2, 2, 1, 1, 1)
    assert (score.precision, score.recall, score.f1) == (0.5, 0.5, 0.5)
    # counting every object instead: A, B and E pair up, C and D are left -> F1 = 6 / 8
    assert match(truth, pred).f1 == 0.75


def test_f1_border_counts_iou_of_exactly_one_half():
    truth = np.zeros((20, 20), np.int32)
    truth[5, 5:13] = 1
    pred = np.zeros((20, 20), np.int32)
    pred[5, 5:9] = 1                      # IoU 4 / 8 = 0.5
    assert f1_border(truth, pred).f1 == 1.0
    assert match(truth, pred).f1 == 0.0   # the DSB rule needs IoU above 0.5


def test_f1_border_pairs_each_object_once():
    truth = np.zeros((20, 20), np.int32)
    truth[5, 5:13] = 1
    pred = np.zeros((20, 20), np.int32)
    pred[5, 5:9] = 1
    pred[5, 9:13] = 2                     # two halves, each with IoU 0.5
    score = f1_border(truth, pred)
    assert (score.tp, score.fp, score.fn) == (1, 1, 0) and score.f1 == pytest.approx(2 / 3)


def test_f1_border_empty_cases():
    only_border = np.zeros((20, 20), np.int32)
    only_border[0:3, 0:3] = 1
    empty = np.zeros((20, 20), np.int32)
    assert f1_border(only_border, empty).f1 == 1.0     # nothing left on either side
    inside = np.zeros((20, 20), np.int32)
    inside[8:10, 8:10] = 5
    assert f1_border(empty, inside).f1 == 0.0 and f1_border(inside, empty).f1 == 0.0


def test_instance_dice_worked_example():
    """The example of docs/predict.md: T1 cols 0-9, T2 cols 20-25, T3 cols 30-33; P1 cols 2-11,
    P2 cols 20-22, P3 cols 40-44. Pairs: (T1, P1) Dice 2*8/20 = 0.8, (T2, P2) 2*3/9 = 2/3;
    T3 and P3 are left: (0.8 + 2/3 + 0 + 0) / 4 = 11/30."""
    truth = strip((0, 9), (20, 25), (30, 33))
    pred = strip((2, 11), (20, 22), (40, 44))
    assert instance_dice(truth, pred) == pytest.approx(11 / 30)
    assert match(truth, pred).f1 == pytest.approx(1 / 3)   # T2-P2 has IoU 0.5: no DSB match
    assert instance_dice(truth, truth) == 1.0


def test_instance_dice_consumes_each_object_once():
    # T cols 0-9 against two halves with equal Dice 2*5/15: the first half is matched, the other left
    truth = strip((0, 9))
    assert instance_dice(truth, strip((0, 4), (5, 9))) == pytest.approx((2 / 3) / 2)
    # greedy by Dice: (T1, P1) 0.8 first, then (T2, P2) 2*2/6, though (T2, P1) also overlaps
    assert instance_dice(strip((0, 9), (10, 13)), strip((2, 11), (12, 13))) == pytest.approx((0.8 + 2 / 3) / 2)


def test_instance_dice_cutoff_and_empty_maps():
    # Dice exactly 0.1 (2 * 1 / (19 + 1)) is not above the cutoff: one miss and one false positive
    assert instance_dice(strip((0, 18)), strip((18, 18))) == 0.0
    assert instance_dice(strip((0, 17)), strip((17, 17))) == pytest.approx((2 / 19) / 1)
    empty = np.zeros((1, 50), np.int32)
    assert instance_dice(empty, empty) == 1.0
    assert instance_dice(empty, strip((3, 5))) == 0.0 and instance_dice(strip((3, 5)), empty) == 0.0


def test_score_table_takes_the_extra_columns():
    truth, pred = border_case()
    scores = {"a": match(truth, pred), "b": match(truth, truth)}
    extra = {"a": extra_scores(truth, pred), "b": extra_scores(truth, truth)}
    table = score_table(scores, extra)
    assert list(table.columns)[-2:] == ["f1_border", "instance_dice"]
    assert table["f1_border"].tolist() == [0.5, 1.0]
    means = mean_scores(table)
    assert means["f1_border"] == 0.75 and means["instance_dice"] == pytest.approx((instance_dice(truth, pred) + 1) / 2)
    only = score_table(scores, {k: extra_scores(truth, truth, ["instance_dice"]) for k in scores})
    assert "f1_border" not in only.columns and "instance_dice" in only.columns
    with pytest.raises(ValueError, match="unknown scores"):
        extra_scores(truth, pred, ["aji"])
