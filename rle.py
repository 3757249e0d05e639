"""Run-length encoding and the submission CSVs: DSB2018 (``ImageId,EncodedPixels``, one row per
nucleus) and the Dice challenge (``img,pixels``, one row per image, its semantic mask).

Pixels are numbered from 1 in column-major order: down the first column, then down the second,
and so on (``order="column"``, the rule both challenges write down). ``order="row"`` numbers them
along each row instead, as NumPy's default ``flatten()`` does (the Dice challenge's sample code
does that, against its own written rule). A run is a pair (start, length); a mask is encoded as
the flat list ``[start1, length1, start2, length2, ...]`` with runs sorted by start and not
overlapping, and written as the string ``"start1 length1 start2 length2"``. No torch here.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from atomic import atomic_path
from config import InputError

HEADER = ("ImageId", "EncodedPixels")
DICE_HEADER = ("img", "pixels")
# pixel numbering: "column" = top to bottom, then left to right; "row" = left to right, then down
ORDERS = {"column": "F", "row": "C"}


def _numpy_order(order: str) -> str:
    try:
        return ORDERS[order]
    except KeyError:
        raise ValueError(f"pixel order {order!r} is not one of {', '.join(ORDERS)}") from None


def rle_encode(mask: np.ndarray, order: str = "column") -> list[int]:
    """Runs of a mask (H, W) (bool, or any array where non-zero is inside) as flat [start, length, ...]
    with 1-based starts, sorted by start; pixels numbered in `order` ("column": down each column,
    the default; "row": along each row). An empty mask gives []."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode: expected a mask (H, W), got shape {mask.shape}")
    flat = mask.ravel(order=_numpy_order(order)) != 0
    # padding with a 0 on both sides makes every run have one rise and one fall in the diff
    padded = np.concatenate(([False], flat, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)   # 0-based index of the first pixel of each run
    ends = np.flatnonzero(edges == -1)    # 0-based index one past its last pixel
    runs = np.empty(2 * starts.size, np.int64)
    runs[0::2] = starts + 1
    runs[1::2] = ends - starts
    return runs.tolist()


def _parse_runs(runs: Sequence[int] | str) -> np.ndarray:
    """Runs as int64 (n, 2) of (start, length); checks everything but the image size."""
    if isinstance(runs, str):
        values = []
        for token in runs.split():
            try:
                values.append(int(token))
            except ValueError:
                raise ValueError(f"run-length string holds a non-integer {token!r}") from None
    else:
        values = list(runs)
        for value in values:
            # bool is an int subclass but True/False as pixel numbers is surely a mistake
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"runs hold a non-integer {value!r}")
    if len(values) % 2:
        raise ValueError(f"runs hold an odd count of numbers ({len(values)}); expected start/length pairs")
    try:
        pairs = np.array(values, dtype=np.int64).reshape(-1, 2)
    except OverflowError:
        raise ValueError("runs hold a number too large for any image") from None
    starts, lengths = pairs[:, 0], pairs[:, 1]
    if np.any(starts < 1):
        raise ValueError(f"run start {int(starts[starts < 1][0])} is out of range (pixels count from 1)")
    if np.any(lengths < 1):
        raise ValueError(f"run length {int(lengths[lengths < 1][0])} is not positive")
    # each run must begin after the previous one ends: this refuses both unsorted and overlapping
    previous_end = starts[:-1] + lengths[:-1]  # first pixel after the previous run
    bad = np.flatnonzero(starts[1:] < previous_end)
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(f"run {i + 1} (start {int(starts[i])}) overlaps or precedes run {i} "
                         f"(pixels {int(starts[i - 1])}..{int(previous_end[i - 1]) - 1}); "
                         "runs must be sorted and must not overlap")
    return pairs


def rle_decode(runs: Sequence[int] | str, shape: tuple[int, int], order: str = "column") -> np.ndarray:
    """Mask bool (H, W) from runs given as a flat list [start, length, ...] or a string "1 3 10 2",
    pixels numbered in `order` (see `rle_encode`).

    Runs must be integer pairs, 1-based, inside the H*W pixels, sorted and not overlapping (runs
    that touch are accepted); anything else is a ValueError saying what is wrong.
    """
    if len(shape) != 2 or any(int(n) != n or n < 0 for n in shape):
        raise ValueError(f"rle_decode: expected a shape (H, W) of non-negative integers, got {shape}")
    height, width = int(shape[0]), int(shape[1])
    pairs = _parse_runs(runs)
    n_pixel = height * width
    if pairs.size:
        last = int(pairs[-1, 0] + pairs[-1, 1] - 1)
        if last > n_pixel:
            raise ValueError(f"run ends at pixel {last}, past the {n_pixel} pixels of a "
                             f"{height}x{width} image")
    # +1 at each run start, -1 one past its end: the running sum is 1 inside runs and 0 elsewhere
    steps = np.zeros(n_pixel + 1, np.int8)
    steps[pairs[:, 0] - 1] += 1
    steps[pairs[:, 0] - 1 + pairs[:, 1]] -= 1
    flat = np.cumsum(steps[:-1], dtype=np.int32) > 0
    return flat.reshape((height, width), order=_numpy_order(order))


def rle_to_string(runs: Sequence[int]) -> str:
    """Flat runs [1, 3, 10, 2] as the submission string "1 3 10 2" ("" for no run)."""
    return " ".join(str(int(value)) for value in runs)


def labels_to_rows(image_id: str, labels: np.ndarray) -> list[tuple[str, str]]:
    """Submission rows of one label map (H, W) (integers, 0 = background): one (image_id, runs)
    row per nucleus id, ids increasing (they need not be contiguous). An image with no nucleus
    gives the single row (image_id, ""), which DSB2018 expects. Since a label map holds one id per
    pixel, no pixel is in two rows.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{image_id}: expected a label map (H, W), got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"{image_id}: expected an integer label map, got dtype {labels.dtype}")
    flat = labels.ravel(order="F").astype(np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError(f"{image_id}: label ids must be >= 0 (0 is background)")
    # one pass over the image for every nucleus at once: cut the flat map where the value changes,
    # keep the non-background pieces, and group them by id (a stable sort keeps starts increasing)
    cuts = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate(([0], cuts)) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    ids = flat[starts]
    keep = ids != 0
    starts, lengths, ids = starts[keep], lengths[keep], ids[keep]
    if ids.size == 0:
        return [(image_id, "")]
    order = np.argsort(ids, kind="stable")
    starts, lengths, ids = starts[order], lengths[order], ids[order]
    groups = np.flatnonzero(np.diff(ids)) + 1
    rows = []
    for run_starts, run_lengths in zip(np.split(starts + 1, groups), np.split(lengths, groups)):
        runs = np.column_stack((run_starts, run_lengths)).ravel()
        rows.append((image_id, rle_to_string(runs)))
    return rows


def write_submission(path: str | os.PathLike, rows: Iterable[tuple[str, str | Sequence[int]]]) -> None:
    """Write rows (image_id, runs as a string or a flat list) as a CSV with the header
    ``ImageId,EncodedPixels``. Written under a temporary name in the same folder and renamed into
    place, so `path` holds either its old content or the whole new file, never a part."""
    _write_csv(path, HEADER, rows)


def _write_csv(path, header: tuple[str, str], rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for image_id, runs in rows:
            writer.writerow((image_id, runs if isinstance(runs, str) else rle_to_string(runs)))


def semantic_row(image_id: str, labels: np.ndarray, order: str = "column") -> tuple[str, str]:
    """The Dice challenge's row of one image: (image_id, runs of its whole foreground, labels > 0),
    pixels numbered in `order`; an image without foreground gets (image_id, "")."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{image_id}: expected a label map or mask (H, W), got shape {labels.shape}")
    return image_id, rle_to_string(rle_encode(labels > 0, order))


def write_dice_submission(path: str | os.PathLike, rows: Iterable[tuple[str, str | Sequence[int]]]) -> None:
    """Write the Dice challenge's CSV: header ``img,pixels``, then one (image_id, runs) row per image
    (runs as a string or a flat list; see `semantic_row`). Atomic, as `write_submission`."""
    _write_csv(path, DICE_HEADER, rows)


def _read_rows(path: Path, header: tuple[str, str]):
    """(line number, image id, runs as (n, 2) pairs) of every non-blank row of a CSV with `header`."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            lines = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError(f"{path}: submission file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable submission CSV ({exc})") from None
    if not lines or tuple(cell.strip() for cell in lines[0]) != header:
        raise InputError(f"{path}: expected the header {','.join(header)}")
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue  # a blank line
        if len(line) != 2:
            raise InputError(f"{path}: line {number}: expected 2 fields, found {len(line)}")
        image_id, text = line
        try:
            pairs = _parse_runs(text)
        except ValueError as exc:
            raise InputError(f"{path}: line {number}: {exc}") from None
        yield number, image_id, pairs


def read_dice_submission(path: str | os.PathLike) -> dict[str, list[int]]:
    """Read a Dice challenge CSV (``img,pixels``): {image_id: flat runs} (runs checked as
    `rle_decode` checks them, bar the image size); an image named twice is an InputError."""
    path = Path(path)
    result: dict[str, list[int]] = {}
    for number, image_id, pairs in _read_rows(path, DICE_HEADER):
        if image_id in result:
            raise InputError(f"{path}: line {number}: image {image_id} has a second row; one row per image")
        result[image_id] = pairs.ravel().tolist()
    return result


def read_submission(path: str | os.PathLike) -> dict[str, list[list[int]]]:
    """Read a submission CSV: {image_id: [runs of each nucleus, in file order]}, where an image
    given only by empty rows maps to []. Checks the header, each row's runs (as `rle_decode` does,
    bar the image size), and that no two nuclei of one image share a pixel; a bad file is an
    InputError naming it."""
    path = Path(path)
    result: dict[str, list[list[int]]] = {}
    for _, image_id, pairs in _read_rows(path, HEADER):
        nuclei = result.setdefault(image_id, [])
        if pairs.size:
            nuclei.append(pairs.ravel().tolist())
    for image_id, nuclei in result.items():
        if len(nuclei) > 1:
            pairs = np.array([run for runs in nuclei for run in runs], np.int64).reshape(-1, 2)
            pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
            if np.any(pairs[1:, 0] < pairs[:-1, 0] + pairs[:-1, 1]):
                raise InputError(f"{path}: image {image_id}: two nuclei share a pixel")
    return result
