"""Tuning of the `[post]` settings and where each `[post]` value at prediction time comes from.

No torch here: tuning works on saved probability maps.

    best, score = tune(items, heads, post)           # items: [(probs, truth labels), ...]
    write_tuned(tuned_path(ckpt), best, score, grid_used, dataset="tune", n_images=40)
    post, origins = resolve_post(cfg, ckpt, use_tuned=True)

A tuned file `<checkpoint>.post.json` holds the tuned values, the mean DSB score they reached, the
grid that was searched, and the images used. Its values are checked like any config value.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from atomic import atomic_path
from config import Config, InputError, PostConfig, check_field  # the config files' own value checks
from metrics import match
from postprocess import drop_faint, peak_diameter, postprocess

TUNE_GRID = {"threshold": (0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "threshold_edge": (0.3, 0.5, 0.7),
             "threshold_mark": (0.3, 0.5, 0.7), "seed_peaks": (False, True), "policy": ("ws", "rw"),
             "min_confidence": (0.0, 0.8, 0.85, 0.9, 0.95)}


def tuned_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".post.json")


def grid_for(heads: set[str], keep_policy: bool = False) -> dict[str, tuple]:
    """The part of TUNE_GRID that matters for models with these heads: thresholds of heads the
    models lack are not searched (nor seed_peaks without a contour head); with keep_policy neither
    is the policy."""
    return {k: v for k, v in TUNE_GRID.items()
            if (k not in ("threshold_edge", "seed_peaks") or "contour" in heads)
            and (k != "threshold_mark" or "marker" in heads) and (k != "policy" or not keep_policy)}


def tune(items: list, heads: set[str], base: PostConfig, keep_policy: bool = False,
         workers: int = 1) -> tuple[PostConfig, float]:
    """The setting of `grid_for(heads, keep_policy)` that `select` picks from the per-image DSB
    scores on `items`, (probs, truth) pairs, and its mean DSB score. `workers` > 1 post-processes
    the grid's settings in that many forked processes on Linux (elsewhere one process does it all;
    the result is the same either way)."""
    grid = grid_for(heads, keep_policy)
    # min_confidence only drops finished instances: each other setting is post-processed once
    others = {k: v for k, v in grid.items() if k != "min_confidence"}
    confidences = grid.get("min_confidence", (base.min_confidence,))
    posts = [dataclasses.replace(base, **dict(zip(others, values)), min_confidence=0.0)
             for values in itertools.product(*others.values())]
    # forked workers inherit `items` (and each map's nucleus diameter for the distance peaks, which
    # no setting changes: estimated once here) through _ITEMS: only settings and scores cross processes
    global _ITEMS
    _ITEMS = [(probs, truth, peak_diameter(probs["semantic"])) for probs, truth in items]
    work = functools.partial(_score_setting, confidences=confidences)
    workers = min(workers, len(posts))
    try:
        if workers > 1 and sys.platform.startswith("linux"):  # fork: safe there, not on macOS
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                found = list(tqdm(pool.imap(work, posts), total=len(posts), desc="tuning", leave=False))
        else:
            found = [work(post) for post in tqdm(posts, desc="tuning", leave=False)]
    finally:
        _ITEMS = None
    settings = [dataclasses.replace(post, min_confidence=c) for post in posts for c in confidences]
    scores = [row for rows in found for row in rows]
    pick = select(np.asarray(scores, np.float64), [change(s, base, grid) for s in settings])
    return settings[pick], float(np.mean(scores[pick]))


_ITEMS = None  # the (probs, truth, diameter) triples that forked tuning workers share


def _score_setting(post: PostConfig, confidences: tuple) -> list[list[float]]:
    """Per-image DSB scores of one post-processing setting on `_ITEMS`, one row per `min_confidence`."""
    items = _ITEMS
    labels = [postprocess(probs, post, diameter) for probs, _, diameter in items]
    return [[match(truth, drop_faint(found, probs["semantic"], confidence, post.confidence)).dsb
             for found, (probs, truth, _) in zip(labels, items)] for confidence in confidences]


def change(post: PostConfig, base: PostConfig, grid: dict[str, tuple]) -> float:
    """How far `post` moves from `base` over the searched keys: each number's distance as a share
    of its grid's span, 1 for each other value (policy, seed_peaks) that differs."""
    total = 0.0
    for key, values in grid.items():
        new, old = getattr(post, key), getattr(base, key)
        if isinstance(new, (bool, str)):
            total += float(new != old)
        else:
            span = max(values) - min(values)
            total += abs(new - old) / span if span else 0.0
    return total


def select(scores: np.ndarray, changes: list[float]) -> int:
    """The index of the setting to keep, from per-image scores (settings, images): the one-standard-
    error rule. The best mean wins on a handful of tune images partly by the luck of those images,
    and its neighbour in the grid is often a cliff (a high min_confidence with a high threshold
    drops true nuclei on other images). So every setting whose mean is below the best's by no more
    than one standard error of their per-image differences is as good as the best, and of those the
    one that changes the starting settings least (`change`) is kept; ties go to the higher mean,
    then to the grid's order. With one image there is no error to allow: the best mean is kept
    (the nearest among equal bests)."""
    means = scores.mean(axis=1)
    best = int(np.argmax(means))
    diffs = scores[best][None, :] - scores
    n = scores.shape[1]
    errors = diffs.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(scores))
    close = np.flatnonzero(diffs.mean(axis=1) <= errors + 1e-12)
    return int(min(close, key=lambda i: (changes[i], -means[i], i)))


def write_tuned(path: Path, post: PostConfig, score: float, grid: dict[str, tuple], **about) -> dict:
    """Save the searched keys' values, the score, the grid and `about` (dataset, n_images, ...)."""
    record = {**{k: getattr(post, k) for k in grid}, "mean_dsb": score,
              "grid": {k: list(v) for k, v in grid.items()}, **about}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def read_tuned(path: Path) -> dict[str, object]:
    """The `[post]` values of a tuned file, each checked like a config value (type, choices,
    range). A damaged file or a bad value is an InputError naming the file and the key."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a tuned-thresholds file ({exc})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: not a tuned-thresholds file (expected a JSON object)")
    fields = {f.name: f for f in dataclasses.fields(PostConfig)}
    values = {}
    for key in TUNE_GRID:
        if key not in record:
            continue  # a key that was not searched (a model without that head)
        value = record[key]
        where = f"{path}: [post] {key}"
        expected = {"policy": str, "seed_peaks": bool}.get(key, (int, float))
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise InputError(f"{where}: {value!r} is not a valid value")
        check_field(fields[key], value, where)
        values[key] = float(value) if expected == (int, float) else value
    if not values:
        raise InputError(f"{path}: not a tuned-thresholds file (none of {', '.join(TUNE_GRID)})")
    return values


def resolve_post(cfg: Config, checkpoint: Path | None, use_tuned: bool) -> tuple[PostConfig, dict[str, str]]:
    """The `[post]` settings for prediction with `cfg` (the checkpoint's settings under the user's
    explicit ones, see config.under_saved) and where each value came from.

    Order: a value the user set explicitly (config.ini or --config) wins; then the tuned file next
    to the checkpoint (unless use_tuned is False); then the value the checkpoint was trained with,
    already in `cfg`. Returns (PostConfig, {key: origin}).
    """
    tuned = {}
    path = tuned_path(checkpoint) if checkpoint is not None else None
    if use_tuned and path is not None and path.is_file():
        tuned = read_tuned(path)
    values, origin = {}, {}
    for f in dataclasses.fields(PostConfig):
        source = cfg.source_of("post", f.name)
        if source is not None:
            origin[f.name] = source
        elif f.name in tuned:
            values[f.name] = tuned[f.name]
            origin[f.name] = str(path)
        else:
            origin[f.name] = "checkpoint" if checkpoint is not None else "defaults"
    return dataclasses.replace(cfg.post, **values), origin
