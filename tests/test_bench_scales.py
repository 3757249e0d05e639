"""bench/accuracy.py --scales: the size test set on the bundled sample (tiny settings)."""
import contextlib
import sys

import numpy as np
import pandas as pd
import pytest

from dataset.io import list_samples, read_image, read_sample
from tests.conftest import REPO, SAMPLE
from tests.test_bench_accuracy import TINY

sys.path.insert(0, str(REPO / "bench"))
import accuracy  # noqa: E402
import size_truth  # noqa: E402


@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet.ini").write_text(TINY.format(model="unet"))
    return tmp_path


def run(*args):
    return accuracy.main(["--data", str(SAMPLE), "--work", "work", "--results", "results.csv",
                          "--tune-images", "2", "--scales", "3", "0.5", *args])


def test_rescaled_validation_copies_are_scored_into_their_own_columns(bench):
    row = run("--config", "unet.ini", "--budget", "5")
    assert 0 <= row["dsb_x3"] <= 1 and 0 <= row["dsb_x0.5"] <= 1
    table = pd.read_csv("results.csv")
    assert {"dsb_x3", "dsb_x0.5"} <= set(table.columns)
    valid_id = next((bench / "work" / "unet" / "data" / "valid").iterdir()).name
    original = next(s for s in list_samples(SAMPLE) if s.id == valid_id)
    h, w = read_image(original.image_path).shape[:2]
    _, truth = read_sample(original)
    for factor, name in ((3, "x3"), (0.5, "x0.5")):
        folder = bench / "work" / "unet" / "data" / f"valid_{name}"
        (sample,) = list_samples(folder)
        image, labels = read_sample(sample)  # the reader refuses a mask of another size than its image
        assert sample.id == valid_id and image.shape[:2] == (round(h * factor), round(w * factor))
        # nearest neighbour keeps every nucleus at x3; at x0.5 only specks may vanish
        assert labels.max() == truth.max() if factor == 3 else truth.max() * 0.8 <= labels.max() <= truth.max()
        assert (labels > 0).sum() == pytest.approx((truth > 0).sum() * factor ** 2, rel=0.05)
        assert pd.read_csv(bench / "work" / "unet" / f"scores_{name}.csv")["dsb"].mean() == pytest.approx(
            row[f"dsb_{name}"])
    # the copies are written once: a second row on the same split reuses them
    copies = sorted((bench / "work" / "scaled").iterdir())
    stamp = [p.stat().st_mtime_ns for p in copies]
    classical = run("--classical")
    assert sorted((bench / "work" / "scaled").iterdir()) == copies
    assert [p.stat().st_mtime_ns for p in copies] == stamp
    assert 0 <= classical["dsb_x3"] <= 1 and list(pd.read_csv("results.csv")["name"]) == ["unet", "classical"]


def test_size_truth_reads_a_finished_run_and_reports_the_rows_scores(bench, capsys):
    row = run("--config", "unet.ini", "--budget", "5")
    capsys.readouterr()
    size_truth.main([str(bench / "work" / "unet"), "--factor", "0.5"])
    out = capsys.readouterr().out
    # the label images it writes give the row's own scores, at full size and at x0.5
    assert f"full-size prediction against full-size truth: {row['dsb']:.3f}" in out
    assert f"| network on the x0.5 images | {row['dsb_x0.5']:.3f} |" in out
    with pytest.raises(SystemExit, match="settings.ini: --true-scale needs a run trained with"):
        size_truth.main([str(bench / "work" / "unet"), "--true-scale"])
    assert capsys.readouterr().out == ""  # refused before anything is scored
    with pytest.raises(SystemExit, match="valid_x2"):
        size_truth.main([str(bench / "work" / "unet"), "--factor", "2"])
    # a row that scored the same checkpoint again (--from-run) is read as well
    again = run("--from-run", "unet", "--name", "again")
    capsys.readouterr()
    size_truth.main([str(bench / "work" / "again"), "--factor", "0.5"])
    assert f"| network on the x0.5 images | {again['dsb_x0.5']:.3f} |" in capsys.readouterr().out


def test_smooth_and_nearest_halving_undo_a_nearest_doubling():
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 24), np.int32)
    for n in range(1, 6):
        y, x = rng.integers(2, 17), rng.integers(2, 21)
        labels[y - 2:y + 2, x - 2:x + 3] = n
    doubled = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)
    assert np.array_equal(size_truth.smooth_small(doubled, labels.shape), labels)
    assert np.array_equal(size_truth.nearest_small(doubled, labels.shape), labels)


def test_two_rows_started_together_share_the_copies(tmp_path, monkeypatch):
    """A second row that finishes writing the copies after the first one uses the first one's."""
    samples = [s for s in list_samples(SAMPLE)][:2]
    ids = [s.id for s in samples]
    real_atomic_dir = accuracy.atomic_dir

    @contextlib.contextmanager
    def racing(path, replace=False):
        with real_atomic_dir(path, replace) as ours:
            # the other row renames its finished copy into place while this one is still writing
            with real_atomic_dir(path) as theirs:
                (theirs / "marker").write_text("written by the other row")
            yield ours
    monkeypatch.setattr(accuracy, "atomic_dir", racing)
    folder = accuracy.scaled_split(samples, ids, 0.5, tmp_path)
    assert (folder / "marker").read_text() == "written by the other row"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind
