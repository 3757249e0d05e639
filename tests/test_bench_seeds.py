"""bench/seeds.py: a recipe's mean and standard error over seeds, and paired differences."""
import math
import sys

import pandas as pd
import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import seeds  # noqa: E402

ROWS = [
    # name, split_seed, family, dsb, dsb_tissue, dsb_x3
    ("new_42", 0, "", 0.60, 0.30, 0.57),
    ("new_42", 1, "", 0.58, 0.20, None),
    ("new_2", 0, "", 0.56, 0.40, 0.54),
    ("new_2", 1, "", 0.62, 0.30, None),
    ("old_42", 0, "", 0.59, 0.30, None),
    ("old_42", 1, "", 0.57, 0.20, None),
    ("old_s0_2", 0, "", 0.55, 0.40, None),
    ("old_s1_2", 1, "", 0.60, 0.30, None),
    ("new_42", 0, "colour_tinted", 0.25, 0.25, None),
]


def _write(tmp_path, rows=ROWS):
    frame = pd.DataFrame(rows, columns=["name", "split_seed", "family", "dsb", "dsb_tissue", "dsb_x3"])
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return path


def test_mean_and_standard_error_per_split(tmp_path, capsys):
    result = seeds.main(["new_42", "new_2", "--results", str(_write(tmp_path))])["runs"]
    mean, se, n = result["split seed 0"]["dsb"]
    assert (round(mean, 6), n) == (0.58, 2)
    # two values 0.60 and 0.56: sample sd 0.02 * sqrt(2), over sqrt(2)
    assert se == pytest.approx(0.02)
    assert result["split seed 0"]["x3 gap"][0] == pytest.approx(-0.025)
    assert "x3 gap" not in result["split seed 1"]
    # a held-out family is its own group, with one run and no error bar
    assert result["held out colour_tinted"]["dsb"] == (pytest.approx(0.25), None, 1)
    assert "split seed 0:" in capsys.readouterr().out


def test_pairs_by_position_with_names_per_split(tmp_path):
    result = seeds.main(["new_42", "new_2", "--against", "old_42", "old_s0_2,old_s1_2",
                         "--results", str(_write(tmp_path))])
    mean, se, n = result["paired"]["split seed 0"]
    assert (round(mean, 6), round(se, 6), n) == (0.01, 0.0, 2)
    mean, se, n = result["paired"]["split seed 1"]
    assert (round(mean, 6), n) == (0.015, 2)
    assert se == pytest.approx(math.sqrt(((0.01 - 0.015) ** 2 + (0.02 - 0.015) ** 2) / 1 / 2))
    # the baseline has no held-out row, so that group has no pair
    assert "held out colour_tinted" not in result["paired"]


def test_errors_name_what_is_wrong(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(SystemExit, match="no row named nope"):
        seeds.main(["new_42", "nope", "--results", str(path)])
    with pytest.raises(SystemExit, match="pair them one to one"):
        seeds.main(["new_42", "new_2", "--against", "old_42", "--results", str(path)])
    with pytest.raises(SystemExit, match="2 rows of run old_s0_2,old_42 for split seed 0"):
        seeds.main(["old_s0_2,old_42", "--results", str(path)])
    with pytest.raises(SystemExit, match="cannot read results file"):
        seeds.main(["new_42", "--results", str(tmp_path / "missing.csv")])


def test_a_results_file_without_the_needed_columns_is_named(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame({"name": ["a"], "dsb": [0.5]}).to_csv(path, index=False)
    with pytest.raises(SystemExit, match=r"other.csv lacks column\(s\) family, split_seed"):
        seeds.main(["a", "--results", str(path)])
