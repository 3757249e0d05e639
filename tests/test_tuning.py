"""What tuning searches per model, and how a tuned file's values come back."""
import dataclasses
import json

import numpy as np
import pytest

from config import InputError, load_config
from tuning import grid_for, read_tuned, tune


def test_the_grid_searches_only_what_the_heads_use():
    assert set(grid_for({"semantic"})) == {"threshold", "policy", "min_confidence"}
    assert set(grid_for({"semantic", "contour"})) == {"threshold", "threshold_edge", "seed_peaks", "policy",
                                                      "min_confidence"}
    three = grid_for({"semantic", "contour", "marker"}, keep_policy=True)
    assert set(three) == {"threshold", "threshold_edge", "threshold_mark", "seed_peaks", "min_confidence"}
    assert three["seed_peaks"] == (False, True)


def test_a_tuned_bool_comes_back_a_bool_and_a_number_a_float(tmp_path):
    path = tmp_path / "best.pkl.post.json"
    path.write_text(json.dumps({"threshold": 1, "seed_peaks": True, "policy": "ws", "mean_dsb": 0.5}))
    assert read_tuned(path) == {"threshold": 1.0, "seed_peaks": True, "policy": "ws"}
    for bad in ({"seed_peaks": 1}, {"threshold": True}):
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match="is not a valid value"):
            read_tuned(path)


def test_tuning_finds_the_confidence_that_drops_faint_texture():
    """Sure nuclei plus faint blobs that are not nuclei: the search keeps the nuclei and drops the
    blobs, and scores each setting as postprocess itself would label the image."""
    from postprocess import postprocess
    yy, xx = np.mgrid[:64, :96]
    truth = np.zeros((64, 96), np.int32)
    semantic = np.zeros((64, 96), np.float32)
    for i, (y, x) in enumerate([(16, 16), (16, 48), (48, 16)], 1):
        inside = (yy - y) ** 2 + (xx - x) ** 2 <= 36
        truth[inside], semantic[inside] = i, 0.99
    for y, x in [(48, 48), (16, 80), (48, 80)]:
        semantic[(yy - y) ** 2 + (xx - x) ** 2 <= 25] = 0.93  # texture: above every threshold, fainter
    base = load_config(user_path=None).post
    best, score = tune([({"semantic": semantic}, truth)], {"semantic"}, base, keep_policy=True)
    assert best.min_confidence == 0.95 and score == 1.0
    assert postprocess({"semantic": semantic}, best).max() == 3
    assert postprocess({"semantic": semantic}, base).max() == 6  # default 0: every blob is kept


def test_a_lead_within_the_images_noise_gives_way_to_the_smaller_change():
    from tuning import select
    rng = np.random.default_rng(0)
    plain = rng.uniform(0.4, 0.7, 40)
    lucky = plain + 0.004 + np.resize([0.05, -0.05], 40)  # ahead by 0.004, its noise 0.05 an image
    assert lucky.mean() > plain.mean()
    assert select(np.stack([plain, lucky]), [0.0, 1.0]) == 0
    # a lead on every image is no luck: it is kept, however far it moves
    better = plain + 0.03
    assert select(np.stack([plain, better]), [0.0, 1.0]) == 1
    # with one image there is no noise to allow for: the best mean wins
    assert select(np.array([[0.5], [0.51]]), [0.0, 1.0]) == 1


def test_the_change_counts_numbers_by_their_grid_span_and_other_values_as_one():
    from tuning import change
    base = load_config(user_path=None).post  # threshold 0.5, min_confidence 0, policy ws
    grid = {"threshold": (0.4, 0.9), "min_confidence": (0.0, 0.95), "policy": ("ws", "rw")}
    moved = dataclasses.replace(base, threshold=0.7, min_confidence=0.95, policy="rw")
    assert change(base, base, grid) == 0
    assert change(moved, base, grid) == pytest.approx(0.2 / 0.5 + 1 + 1)


def test_tuning_in_worker_processes_picks_what_one_process_picks():
    """`valid.py --tune-workers`: the grid post-processed in forked workers gives the same setting
    and score as in one process (several images, semantic and contour heads)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:48, :48]
    items = []
    for _ in range(3):
        truth = np.zeros((48, 48), np.int32)
        semantic = rng.uniform(0, 0.3, (48, 48)).astype(np.float32)
        contour = np.zeros((48, 48), np.float32)
        for i, (y, x) in enumerate(rng.integers(8, 40, (3, 2)), 1):
            disk = (yy - y) ** 2 + (xx - x) ** 2 <= 25
            truth[disk & (truth == 0)] = i
            semantic[disk] = rng.uniform(0.6, 1.0)
            contour[disk & ((yy - y) ** 2 + (xx - x) ** 2 >= 12)] = rng.uniform(0.2, 0.9)
        items.append(({"semantic": semantic, "contour": contour}, truth))
    base = load_config(user_path=None).post
    one = tune(items, {"semantic", "contour"}, base, keep_policy=True)
    two = tune(items, {"semantic", "contour"}, base, keep_policy=True, workers=2)
    assert one == two and 0 < one[1] <= 1
