"""What tuning searches per model, and how a tuned file's values come back."""
import json

import pytest

from config import InputError
from tuning import grid_for, read_tuned


def test_the_grid_searches_only_what_the_heads_use():
    assert set(grid_for({"semantic"})) == {"threshold", "policy"}
    assert set(grid_for({"semantic", "contour"})) == {"threshold", "threshold_edge", "seed_peaks", "policy"}
    three = grid_for({"semantic", "contour", "marker"}, keep_policy=True)
    assert set(three) == {"threshold", "threshold_edge", "threshold_mark", "seed_peaks"}
    assert three["seed_peaks"] == (False, True)


def test_a_tuned_bool_comes_back_a_bool_and_a_number_a_float(tmp_path):
    path = tmp_path / "best.pkl.post.json"
    path.write_text(json.dumps({"threshold": 1, "seed_peaks": True, "policy": "ws", "mean_dsb": 0.5}))
    assert read_tuned(path) == {"threshold": 1.0, "seed_peaks": True, "policy": "ws"}
    for bad in ({"seed_peaks": 1}, {"threshold": True}):
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match="is not a valid value"):
            read_tuned(path)
