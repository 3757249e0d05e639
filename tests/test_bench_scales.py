"""bench/accuracy.py --scales: the size test set on the bundled sample (tiny settings)."""
import contextlib
import re
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
        # the half-size masks are the smooth ones (each nucleus area-averaged, kept at half cover, so
        # the pixels a border halves count in: a little more area than a quarter)
        area = (truth > 0).sum() * factor ** 2
        assert area <= (labels > 0).sum() <= area * 1.15 if factor < 1 else (labels > 0).sum() == pytest.approx(area, rel=0.05)
        made = accuracy.nearest_labels(truth, labels.shape) if factor == 3 else accuracy.smooth_labels(truth, labels.shape)
        assert same_partition(labels, made)
        assert pd.read_csv(bench / "work" / "unet" / f"scores_{name}.csv")["dsb"].mean() == pytest.approx(
            row[f"dsb_{name}"])
    # the copies are written once: a second row on the same split reuses them
    copies = sorted((bench / "work" / "scaled").iterdir())
    stamp = [p.stat().st_mtime_ns for p in copies]
    classical = run("--classical")
    assert sorted((bench / "work" / "scaled").iterdir()) == copies
    assert [p.stat().st_mtime_ns for p in copies] == stamp
    assert 0 <= classical["dsb_x3"] <= 1 and list(pd.read_csv("results.csv")["name"]) == ["unet", "classical"]
    assert list(pd.read_csv("results.csv")["shrink_truth"]) == ["smooth", "smooth"]
    # the nearest-neighbour half-size set of earlier rows is still there to be asked for, in its own folder
    nearest = run("--classical", "--shrink-truth", "nearest", "--name", "classical_nearest")
    assert nearest["shrink_truth"] == "nearest" and nearest["dsb_x3"] == classical["dsb_x3"]
    folder = bench / "work" / "classical_nearest" / "data" / "valid_x0.5"
    assert not folder.resolve().name.endswith("-smooth") and folder.resolve().parent == copies[0].parent
    (sample,) = list_samples(folder)
    _, labels = read_sample(sample)
    assert same_partition(labels, accuracy.nearest_labels(truth, labels.shape))
    assert not same_partition(labels, accuracy.smooth_labels(truth, labels.shape))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same pixels in the same groups, whatever the label values."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b)) and ((pairs[0] == 0) == (pairs[1] == 0)).all()


def test_size_truth_reads_a_finished_run_and_reports_the_rows_scores(bench, capsys):
    row = run("--config", "unet.ini", "--budget", "5")
    capsys.readouterr()
    size_truth.main([str(bench / "work" / "unet"), "--factor", "0.5"])
    out = capsys.readouterr().out
    # the label images it writes give the row's own scores, at full size and at x0.5 (the set's
    # masks are the smooth ones: the second column)
    assert f"full-size prediction against full-size truth: {row['dsb']:.3f}" in out
    assert "its masks made small: smooth" in out
    assert re.search(rf"\| network on the x0\.5 images \| [0-9.]+ \| {row['dsb_x0.5']:.3f} \|", out)
    with pytest.raises(SystemExit, match="settings.ini: --true-scale needs a run trained with"):
        size_truth.main([str(bench / "work" / "unet"), "--true-scale"])
    assert capsys.readouterr().out == ""  # refused before anything is scored
    with pytest.raises(SystemExit, match="valid_x2"):
        size_truth.main([str(bench / "work" / "unet"), "--factor", "2"])
    # a row that scored the same checkpoint again (--from-run) is read as well
    again = run("--from-run", "unet", "--name", "again")
    capsys.readouterr()
    size_truth.main([str(bench / "work" / "again"), "--factor", "0.5"])
    assert re.search(rf"\| network on the x0\.5 images \| [0-9.]+ \| {again['dsb_x0.5']:.3f} \|",
                     capsys.readouterr().out)


def test_smooth_and_nearest_halving_undo_a_nearest_doubling():
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 24), np.int32)
    for n in range(1, 6):
        y, x = rng.integers(2, 17), rng.integers(2, 21)
        labels[y - 2:y + 2, x - 2:x + 3] = n
    doubled = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)
    assert np.array_equal(accuracy.smooth_labels(doubled, labels.shape), labels)
    assert np.array_equal(accuracy.nearest_labels(doubled, labels.shape), labels)


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
