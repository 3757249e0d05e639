"""valid.py end to end on the bundled sample: train briefly, then score, tune, export and submit."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train
import valid
from dataset.io import list_samples, read_sample
from rle import read_submission, rle_decode
from tests.conftest import REPO, SAMPLE, run_in_kernel

SETTINGS = """
[model]
model = camunet
encoder = plain
n_filter = 4
[train]
; tiny networks train faster in float32 than in bfloat16, even with AMX (docs/training.md)
amp = off
n_batch = 4
n_worker = 0
n_cv_epoch = 1
checkpoint_dir = ckpt
log_dir = runs
learn_rate = 0.003
[pre]
width = 64
[dataset]
root = data
cv_ratio = 0.25
cache_dir = cache
[valid]
test_time_augment = True
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A work folder with data/train (the sample), data/test (two images without masks) and a
    checkpoint trained for two epochs."""
    work = tmp_path_factory.mktemp("valid")
    (work / "data").mkdir()
    (work / "data" / "train").symlink_to(SAMPLE)
    for files in list_samples(SAMPLE)[:2]:
        target = work / "data" / "test" / files.id / "images"
        target.mkdir(parents=True)
        shutil.copy(files.image_path, target)
    (work / "settings.ini").write_text(SETTINGS)
    import os
    old = os.getcwd()
    os.chdir(work)
    try:
        train.main(["--epoch", "2", "--config", "settings.ini", "--quiet"])
    finally:
        os.chdir(old)
    return work


@pytest.fixture
def work(trained, monkeypatch):
    monkeypatch.chdir(trained)
    return trained


def test_scores_on_the_validation_split(work, capsys):
    means = valid.main(["--dataset", "valid", "--config", "settings.ini", "--scores", "scores.csv",
                        "--save", "figs"])
    assert set(means) == {"dsb", "precision", "recall", "f1", "dice"}
    assert all(0.0 <= v <= 1.0 for v in means.values())
    out = capsys.readouterr().out
    assert "mean: dsb" in out
    table = (work / "scores.csv").read_text().splitlines()
    assert table[0].startswith("image_id,dsb,precision,recall,f1,dice") and len(table) == 3
    assert len(list((work / "figs").glob("*.png"))) == 2


def test_ensemble_csv_follows_the_submission_rules(work):
    ckpt = work / "ckpt" / "ckpt-2.pkl"
    valid.main([str(ckpt), str(ckpt), "--config", "settings.ini", "--csv", "double.csv"])
    valid.main([str(ckpt), "--config", "settings.ini", "--csv", "single.csv"])
    text = (work / "double.csv").read_text()
    assert text.splitlines()[0] == "ImageId,EncodedPixels"
    assert text == (work / "single.csv").read_text()  # one checkpoint twice = that checkpoint
    submission = read_submission(work / "double.csv")
    tests = list_samples(work / "data" / "test")
    assert set(submission) == {s.id for s in tests}
    for files in tests:
        image, _ = read_sample(files)
        taken = np.zeros(image.shape[:2], int)
        for runs in submission[files.id]:
            assert runs[::2] == sorted(runs[::2])
            taken += rle_decode(runs, image.shape[:2])
        assert taken.max() <= 1  # no pixel in two nuclei


def test_masks_and_label_tiffs_round_trip(work):
    valid.main(["--dataset", "valid", "--config", "settings.ini", "--masks", "pred", "--labels", "tifs"])
    import tifffile
    for files in list_samples(work / "pred"):
        _, labels = read_sample(files) if files.mask_paths else (None, None)
        tif = tifffile.imread(work / "tifs" / f"{files.id}.tif")
        if labels is None:
            assert tif.max() == 0
        else:
            assert np.array_equal(labels > 0, tif > 0) and labels.max() == tif.max()


def test_every_metric_the_dice_csv_and_png_labels(work, capsys):
    """--metric all adds the border-free F1 and instance Dice columns; the Dice challenge CSV holds
    each image's foreground, and both agree with the label images written beside them."""
    import cv2
    import pandas as pd
    from metrics import f1_border, instance_dice
    from rle import read_dice_submission
    means = valid.main(["--dataset", "valid", "--config", "settings.ini", "--metric", "all", "--scores",
                        "all.csv", "--dice-csv", "dice.csv", "--dice-order", "row", "--labels", "pngs",
                        "--label-format", "png"])
    assert set(means) == {"dsb", "precision", "recall", "f1", "dice", "f1_border", "instance_dice"}
    assert "score (--metric): mean dsb" in capsys.readouterr().out
    table = pd.read_csv(work / "all.csv")
    rows = read_dice_submission(work / "dice.csv")
    assert set(rows) == set(table["image_id"])
    samples = {s.id: s for s in dataset_samples_of(work)}
    for _, row in table.iterrows():
        labels = cv2.imread(str(work / "pngs" / f"{row['image_id']}.png"), cv2.IMREAD_UNCHANGED)
        _, truth = read_sample(samples[row["image_id"]])
        assert labels.dtype == np.uint16
        assert row["f1_border"] == pytest.approx(f1_border(truth, labels).f1)
        assert row["instance_dice"] == pytest.approx(instance_dice(truth, labels))
        assert np.array_equal(rle_decode(rows[row["image_id"]], labels.shape, "row"), labels > 0)


def dataset_samples_of(work):
    from config import load_config
    cfg = load_config(work / "settings.ini", user_path=None)
    return valid.dataset_samples(cfg, "valid")


def test_tune_saves_thresholds_that_later_runs_use(work, capsys):
    score = valid.main(["--dataset", "valid", "--config", "settings.ini", "--tune"])
    saved = work / "ckpt" / "ckpt-2.pkl.post.json"
    assert saved.is_file() and 0.0 <= score <= 1.0
    valid.main(["--dataset", "valid", "--config", "settings.ini"])
    assert "(ckpt/ckpt-2.pkl.post.json)" in capsys.readouterr().out
    saved.unlink()


def run(work, *args):
    return subprocess.run([sys.executable, str(REPO / "valid.py"), *args, "--config", "settings.ini"],
                          cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})


def test_bad_checkpoint_is_one_line_and_writes_nothing(work):
    (work / "junk.pkl").write_bytes(b"junk")
    result = run(work, "junk.pkl", "--csv", "bad.csv")
    assert result.returncode == 2 and "junk.pkl: not a readable checkpoint" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (work / "bad.csv").exists()


def test_unreadable_image_leaves_no_partial_csv(work, tmp_path):
    broken = work / "data" / "broken"
    shutil.copytree(work / "data" / "test", broken)
    sample = sorted(broken.iterdir())[-1]
    (next((sample / "images").iterdir())).write_bytes(b"not an image")
    result = run(work, "--dataset", "broken", "--csv", "partial.csv")
    shutil.rmtree(broken)
    assert result.returncode == 2 and "not a readable image" in result.stderr
    assert not (work / "partial.csv").exists()


def test_missing_dataset_folder(work):
    result = run(work, "--dataset", "nowhere", "--csv", "x.csv")
    assert result.returncode == 2 and "data/nowhere: dataset folder not found" in result.stderr


def test_run_valid_inside_a_jupyter_kernel(work):
    """`%run valid.py --show` in a notebook draws the figures and leaves the kernel running."""
    replies = run_in_kernel(work, ["%matplotlib agg",
                                   f"%run {REPO / 'valid.py'} --dataset valid --show --config settings.ini"])
    assert [r["status"] for r in replies] == ["ok", "ok"], [(r.get("ename"), r.get("evalue")) for r in replies]
