"""Run-length encoding follows DSB2018 (1-based, column-major) and the submission CSV is atomic."""
import os

import numpy as np
import pytest

from config import InputError
from rle import (labels_to_rows, read_dice_submission, read_submission, rle_decode, rle_encode,
                 rle_to_string, semantic_row, write_dice_submission, write_submission)


def one_pixel(shape, row, col):
    mask = np.zeros(shape, bool)
    mask[row, col] = True
    return mask


# --- known encodings, worked out by hand ------------------------------------------------------

def test_middle_column_of_3x3():
    mask = np.zeros((3, 3), bool)
    mask[:, 1] = True
    # column-major numbering: column 0 is pixels 1..3, column 1 is pixels 4..6
    assert rle_encode(mask) == [4, 3]


def test_column_major_on_non_square():
    # 2 rows x 3 columns; numbering goes down each column:  1 3 5
    #                                                      2 4 6
    mask = np.array([[1, 1, 0],
                     [0, 1, 1]], bool)
    # pixels 1 (0,0), 3 (0,1), 4 (1,1), 6 (1,2) -> runs 1x1, 3x2, 6x1
    assert rle_encode(mask) == [1, 1, 3, 2, 6, 1]
    assert rle_encode(mask.T) == [1, 2, 5, 2]  # 3 rows x 2 columns: pixels 1, 2, 5, 6
    assert rle_encode(one_pixel((2, 3), 0, 1)) == [3, 1]   # row-major order would say 2
    assert rle_encode(one_pixel((3, 5), 2, 0)) == [3, 1]
    assert rle_encode(one_pixel((3, 5), 0, 1)) == [4, 1]


def test_runs_cross_column_boundaries():
    mask = np.zeros((3, 3), bool)
    mask[2, 0] = mask[0, 1] = True  # pixels 3 and 4: one run across the column break
    assert rle_encode(mask) == [3, 2]


def test_edge_masks():
    assert rle_encode(np.zeros((4, 6), bool)) == []
    assert rle_encode(np.ones((4, 6), bool)) == [1, 24]
    assert rle_encode(one_pixel((4, 6), 0, 0)) == [1, 1]
    assert rle_encode(one_pixel((4, 6), 3, 5)) == [24, 1]
    assert rle_encode(np.ones((1, 1), bool)) == [1, 1]
    assert rle_encode(np.zeros((0, 5), bool)) == []


def test_encode_returns_python_ints():
    runs = rle_encode(np.ones((2, 2), bool))
    assert all(type(v) is int for v in runs)


def test_rle_to_string():
    assert rle_to_string([1, 3, 10, 2]) == "1 3 10 2"
    assert rle_to_string(np.array([1, 3], np.int64)) == "1 3"
    assert rle_to_string([]) == ""


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (1, 7), (7, 1), (16, 16), (13, 29)])
def test_round_trip_edge_masks(shape):
    masks = [np.zeros(shape, bool), np.ones(shape, bool), one_pixel(shape, 0, 0),
             one_pixel(shape, shape[0] - 1, shape[1] - 1), one_pixel(shape, shape[0] // 2, shape[1] // 2)]
    for mask in masks:
        runs = rle_encode(mask)
        assert np.array_equal(rle_decode(runs, shape), mask)
        assert np.array_equal(rle_decode(rle_to_string(runs), shape), mask)
        assert rle_decode(runs, shape).dtype == bool


def test_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for i in range(30):
        shape = tuple(rng.integers(1, 40, size=2))
        mask = rng.random(shape) < rng.random()
        runs = rle_encode(mask)
        assert np.array_equal(rle_decode(runs, shape), mask)
        assert np.array_equal(rle_decode(rle_to_string(runs), shape), mask)
        starts = runs[0::2]
        assert starts == sorted(starts)


def test_decode_accepts_touching_runs_and_whitespace():
    assert rle_decode("1 2 3 2", (2, 2)).all()
    assert rle_decode("  4 3\n", (3, 3))[:, 1].all()
    assert not rle_decode("", (3, 3)).any()
    assert not rle_decode([], (3, 3)).any()


# --- decode errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("runs, message", [
    ("1 2 3", "odd"),
    ([1, 2, 3], "odd"),
    ("1 a", "non-integer"),
    ("1.5 2", "non-integer"),
    ([1.0, 2], "non-integer"),
    ([True, 2], "non-integer"),
    ("0 2", "out of range"),
    ("-1 2", "out of range"),
    ("1 0", "not positive"),
    ("8 3", "past the 9 pixels"),
    ("10 1", "past the 9 pixels"),
    ("99999999999999999999999 1", "too large"),
    ("5 1 1 1", "sorted"),
    ("1 3 2 2", "overlap"),
    ("4 2 4 1", "overlap"),
])
def test_decode_errors(runs, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(runs, (3, 3))


def test_decode_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        rle_decode("1 1", (3,))


def test_encode_refuses_non_2d():
    with pytest.raises(ValueError, match="shape"):
        rle_encode(np.zeros((2, 2, 2), bool))


# --- label maps to rows -----------------------------------------------------------------------

def test_labels_to_rows_empty_image_gives_one_empty_row():
    assert labels_to_rows("abc", np.zeros((5, 4), np.int32)) == [("abc", "")]


def test_labels_to_rows_non_contiguous_ids():
    labels = np.zeros((4, 5), np.int32)
    labels[0:2, 0] = 40   # pixels 1, 2
    labels[3, 4] = 3      # pixel 20
    labels[:, 2] = 17     # pixels 9..12
    labels[0, 3] = 17     # pixel 13: joins the previous run
    labels[2, 0] = 40     # pixel 3: joins 40's first run
    labels[0, 1] = 40     # pixel 5: a second run of 40
    rows = labels_to_rows("img", labels)
    assert rows == [("img", "20 1"), ("img", "9 5"), ("img", "1 3 5 1")]


def test_labels_to_rows_match_per_id_encoding():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 0, 0, 2, 5, 9, 1000]), size=(23, 31)).astype(np.int32)
    rows = labels_to_rows("x", labels)
    ids = [2, 5, 9, 1000]
    assert [r[1] for r in rows] == [rle_to_string(rle_encode(labels == i)) for i in ids]
    # decoding every row rebuilds the map, and no pixel is claimed twice
    rebuilt = np.zeros_like(labels)
    for label_id, (_, text) in zip(ids, rows):
        mask = rle_decode(text, labels.shape)
        assert not (rebuilt[mask] != 0).any()
        rebuilt[mask] = label_id
    assert np.array_equal(rebuilt, labels)


def test_labels_to_rows_no_background():
    assert labels_to_rows("f", np.full((2, 3), 7, np.int64)) == [("f", "1 6")]


# --- submission CSV ---------------------------------------------------------------------------

ROWS = [("a", "1 3 10 2"), ("a", "20 1"), ("b", ""), ("c,with comma", "5 5")]


def leftovers(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_write_submission_header_and_round_trip(tmp_path):
    path = tmp_path / "sub" / "submission.csv"
    write_submission(path, ROWS)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    assert lines[1] == "a,1 3 10 2"
    assert lines[3] == "b,"
    assert leftovers(path.parent, path.name) == []  # no temporary file left behind
    assert read_submission(path) == {"a": [[1, 3, 10, 2], [20, 1]], "b": [], "c,with comma": [[5, 5]]}


def test_write_submission_from_labels(tmp_path):
    labels = np.zeros((6, 6), np.int32)
    labels[1:3, 1:3] = 4
    labels[4:, 4:] = 2
    rows = labels_to_rows("img", labels) + labels_to_rows("empty", np.zeros((6, 6), np.int32))
    path = tmp_path / "s.csv"
    write_submission(path, rows)
    read = read_submission(path)
    assert read == {"img": [[29, 2, 35, 2], [8, 2, 14, 2]], "empty": []}
    assert np.array_equal(rle_decode(read["img"][1], (6, 6)), labels == 4)


def test_write_submission_accepts_run_lists(tmp_path):
    path = tmp_path / "s.csv"
    write_submission(path, [("a", [1, 2]), ("b", [])])
    assert read_submission(path) == {"a": [[1, 2]], "b": []}


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_submission(path, ROWS)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"
    write_submission(path, ROWS[:1])
    old = path.read_bytes()

    def bad_rows():
        yield ("x", "1 1")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_submission(path, bad_rows())
    assert path.read_bytes() == old
    assert leftovers(tmp_path, path.name) == []


@pytest.mark.parametrize("text, message", [
    ("Id,Pixels\na,1 1\n", "header"),
    ("", "header"),
    ("ImageId,EncodedPixels\na,1 2 3\n", "line 2: .*odd"),
    ("ImageId,EncodedPixels\na,1 1\nb,x 1\n", "line 3: .*non-integer"),
    ("ImageId,EncodedPixels\na,5 1 1 1\n", "line 2: .*sorted"),
    ("ImageId,EncodedPixels\na,1 1,extra\n", "line 2: expected 2 fields"),
    ("ImageId,EncodedPixels\na,1 5\na,3 1\n", "image a: two nuclei share a pixel"),
])
def test_read_submission_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message) as info:
        read_submission(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_submission_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_submission(tmp_path / "nope.csv")


# --- the Dice challenge's CSV: img,pixels, one row per image, both pixel orders -----------------

def test_row_order_numbers_along_rows():
    # 2 rows x 3 columns; row order numbers   1 2 3     column order   1 3 5
    #                                         4 5 6                    2 4 6
    mask = np.array([[1, 1, 0],
                     [0, 1, 1]], bool)
    assert rle_encode(mask, "row") == [1, 2, 5, 2]
    assert rle_encode(mask, "column") == [1, 1, 3, 2, 6, 1]
    assert rle_encode(one_pixel((2, 3), 0, 1), "row") == [2, 1]
    assert rle_encode(one_pixel((2, 3), 1, 0), "row") == [4, 1]
    assert np.array_equal(rle_decode("1 2 5 2", (2, 3), "row"), mask)


def test_row_order_equals_the_challenge_sample_flatten():
    """The Dice challenge's sample code flattens row by row: its runs are ours with order="row"."""
    rng = np.random.default_rng(3)
    mask = rng.random((7, 5)) > 0.6
    flat = np.concatenate(([0], mask.flatten().astype(int), [0]))
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    changes[1::2] -= changes[::2]
    assert rle_encode(mask, "row") == changes.tolist()
    for order in ("row", "column"):
        assert np.array_equal(rle_decode(rle_encode(mask, order), mask.shape, order), mask)


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="'diagonal' is not one of column, row"):
        rle_encode(np.zeros((2, 2)), "diagonal")


def test_semantic_row_joins_every_nucleus():
    labels = np.zeros((3, 3), np.int32)
    labels[0, 0] = 5
    labels[1, 0] = 2    # touches 5: one run in column order
    labels[0, 2] = 9
    assert semantic_row("7", labels) == ("7", "1 2 7 1")
    assert semantic_row("7", labels, "row") == ("7", "1 1 3 2")
    assert semantic_row("none", np.zeros((3, 3), np.int32)) == ("none", "")


def test_dice_submission_header_rows_and_round_trip(tmp_path):
    path = tmp_path / "out" / "dice.csv"
    write_dice_submission(path, [("1", "1 1 5 1"), ("2", [1, 1]), ("3", "")])
    assert path.read_text(encoding="utf-8") == "img,pixels\n1,1 1 5 1\n2,1 1\n3,\n"
    assert read_dice_submission(path) == {"1": [1, 1, 5, 1], "2": [1, 1], "3": []}
    assert leftovers(path.parent, path.name) == []


def test_dice_submission_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "dice.csv"
    write_dice_submission(path, [("1", "1 1")])
    old = path.read_bytes()

    def bad_rows():
        yield ("2", "1 1")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_dice_submission(path, bad_rows())
    assert path.read_bytes() == old and leftovers(tmp_path, path.name) == []


@pytest.mark.parametrize("text, message", [
    ("ImageId,EncodedPixels\n1,1 1\n", "header img,pixels"),
    ("img,pixels\n1,1 1\n1,5 1\n", "line 3: image 1 has a second row"),
    ("img,pixels\n1,3 1 1 1\n", "line 2: .*sorted"),
])
def test_read_dice_submission_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_dice_submission(path)
