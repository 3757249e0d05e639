"""Prediction that users can trust: the checkpoint carries its preprocessing and settings, the
training log's score is the score valid.py gives, and no command line can overwrite a checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import valid
from config import InputError, load_config
from inference import Member, predict_image, tile_layout
from model.checkpoint import read_checkpoint
from tests.conftest import REPO, train_on_sample

# a model that learns enough in a few seconds to find nuclei (DSB above 0), trained with a
# contrast stretch, a non-default data folder and a non-default [post] threshold: all of them
# must come back from the checkpoint when valid.py runs without this file
SETTINGS = """
[model]
model = unet
encoder = plain
n_filter = 8
[train]
; tiny networks train faster in float32 than in bfloat16, even with AMX (docs/training.md)
amp = off
n_batch = 4
n_worker = 0
n_cv_epoch = 2
n_epoch = 16
checkpoint_dir = ckpt
log_dir = runs
learn_rate = 0.003
[pre]
width = 96
stretch = True
[dataset]
root = mydata
cv_ratio = 0.25
cache_dir = cache
[post]
threshold = 0.3
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_on_sample(tmp_path_factory.mktemp("trust"), SETTINGS)


@pytest.fixture
def work(trained, monkeypatch):
    monkeypatch.chdir(trained)
    for name in ("config.ini", "other.ini"):
        (trained / name).unlink(missing_ok=True)
    return trained


def run(work, *args):
    return subprocess.run([sys.executable, str(REPO / "valid.py"), *args], cwd=work, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_training_score_of_best_equals_valid_no_tuned(work):
    """best.pkl is chosen by the score valid.py gives it: one inference path."""
    best = read_checkpoint(work / "ckpt" / "best.pkl")["scores"]["valid_score"]
    assert best > 0  # a model that finds nuclei, so the comparison means something
    means = valid.main(["ckpt/best.pkl", "--dataset", "valid", "--no-tuned", "--config", "train.ini",
                        "--no-figures"])
    assert means["dsb"] == pytest.approx(best, abs=1e-6)


def test_same_numbers_with_or_without_the_training_config(work, capsys):
    with_cfg = valid.main(["ckpt/best.pkl", "--dataset", "valid", "--config", "train.ini", "--scores", "a.csv"])
    without = valid.main(["ckpt/best.pkl", "--dataset", "valid", "--scores", "b.csv"])
    assert with_cfg == without
    assert (work / "a.csv").read_text() == (work / "b.csv").read_text()
    out = capsys.readouterr().out
    assert "settings from checkpoint best.pkl:" in out and "[pre] stretch = True" in out
    assert "[dataset] root = mydata" in out and "threshold = 0.3 (checkpoint)" in out


def test_explicit_preprocessing_that_contradicts_the_checkpoint_is_refused(work):
    (work / "other.ini").write_text("[pre]\nstretch = False\n")
    result = run(work, "ckpt/best.pkl", "--dataset", "valid", "--config", "other.ini", "--scores", "c.csv")
    assert result.returncode == 2 and not (work / "c.csv").exists()
    assert result.stderr.strip().count("\n") == 0
    assert "other.ini: [pre] stretch = False, but ckpt/best.pkl was trained with True" in result.stderr
    forced = run(work, "ckpt/best.pkl", "--dataset", "valid", "--config", "other.ini", "--scores", "c.csv",
                 "--override-pre")
    assert forced.returncode == 0, forced.stderr
    assert run(work, "ckpt/best.pkl", "--dataset", "valid", "--scores", "d.csv").returncode == 0
    # unstretched input: other maps, other scores
    assert (work / "c.csv").read_text() != (work / "d.csv").read_text()


def test_ensemble_members_each_get_their_own_preprocessing(cfg):
    class Mean(torch.nn.Module):
        stride = 1
        heads = ("semantic",)

        def predict(self, x):
            return {"semantic": x.mean(1, keepdim=True)}
    rng = np.random.default_rng(0)
    image = (rng.random((20, 24, 3)) * 60 + 40).astype(np.uint8)  # dim: the stretch changes it a lot
    plain, stretched = cfg.pre, cfg.replace("pre", stretch=True).pre
    valid_cfg = cfg.replace("valid", test_time_augment=False).valid
    a = predict_image([Member(Mean(), plain)], image, valid_cfg)["semantic"]
    b = predict_image([Member(Mean(), stretched)], image, valid_cfg)["semantic"]
    both = predict_image([Member(Mean(), plain), Member(Mean(), stretched)], image, valid_cfg)["semantic"]
    assert np.abs(a - b).max() > 0.1
    np.testing.assert_allclose(both, (a + b) / 2, atol=1e-6)


def test_tuned_values_are_checked_and_explicit_settings_win(work, capsys):
    tuned = work / "ckpt" / "best.pkl.post.json"
    try:
        tuned.write_text(json.dumps({"threshold": 1.5, "policy": "ws"}))
        with pytest.raises(InputError, match=r"best.pkl.post.json: \[post\] threshold: 1.5 is above the maximum"):
            valid.main(["ckpt/best.pkl", "--dataset", "valid", "--no-figures"])
        tuned.write_text(json.dumps({"threshold": 0.8, "seed_peaks": "yes"}))
        with pytest.raises(InputError, match=r"best.pkl.post.json: \[post\] seed_peaks: 'yes' is not a valid value"):
            valid.main(["ckpt/best.pkl", "--dataset", "valid", "--no-figures"])
        tuned.write_text(json.dumps({"threshold": 0.8, "policy": "rw"}))
        (work / "other.ini").write_text("[post]\nthreshold = 0.35\n")
        valid.main(["ckpt/best.pkl", "--dataset", "valid", "--config", "other.ini", "--no-figures"])
        out = capsys.readouterr().out
        assert "threshold = 0.35 (other.ini)" in out and "policy = rw (ckpt/best.pkl.post.json)" in out
    finally:
        tuned.unlink(missing_ok=True)


def test_tune_records_its_grid(work):
    try:
        valid.main(["ckpt/best.pkl", "--dataset", "valid", "--tune"])
        record = json.loads((work / "ckpt" / "best.pkl.post.json").read_text())
        assert record["grid"]["threshold"] == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        assert "threshold_mark" not in record["grid"]  # a one-head model has no marker to tune
        assert record["n_images"] == 2 and record["checkpoints"] == ["best.pkl"]
    finally:
        (work / "ckpt" / "best.pkl.post.json").unlink(missing_ok=True)


def test_a_mistyped_csv_flag_does_not_destroy_the_checkpoint(work):
    """`valid.py --csv best.pkl ...` once wrote the submission over best.pkl."""
    ckpt = work / "ckpt" / "best.pkl"
    before = ckpt.read_bytes()
    result = run(work, "--csv", "ckpt/best.pkl", "--dataset", "valid")
    assert result.returncode == 0, result.stderr
    assert ckpt.read_bytes() == before
    assert (work / "submission.csv").read_text().startswith("ImageId,EncodedPixels")
    result = run(work, "ckpt/best.pkl", "--dataset", "valid", "--scores", "ckpt/best.pkl")
    assert result.returncode == 2 and "would write over a checkpoint" in result.stderr
    result = run(work, "ckpt/best.pkl", "--dataset", "valid", "--masks", "mydata/train")
    assert result.returncode == 2 and "would write into the images being read" in result.stderr
    assert ckpt.read_bytes() == before


def test_side_by_side_figures_by_default(work, monkeypatch, capsys):
    titles = []
    real = valid.draw
    monkeypatch.setattr(valid, "draw", lambda *a: titles.append(a[-1]) or real(*a))
    valid.main(["ckpt/best.pkl", "--dataset", "valid"])
    assert "side-by-side figures -> out/figures" in capsys.readouterr().out
    assert len(list((work / "out" / "figures").glob("*.png"))) == 2
    assert len(titles) == 2 and all("IoU " in t and "DSB score " in t for t in titles)


def test_tiles_share_a_slightly_large_image_evenly():
    """1030 x 1349 with tile_size 1024 was four 1024-pixel tiles (3x the image's pixels)."""
    th, ys = tile_layout(1030, 1024, 64, 32)
    tw, xs = tile_layout(1349, 1024, 64, 32)
    assert (th, ys) == (576, [0, 454]) and len(xs) == 2 and xs[-1] + tw == 1349
    assert th * tw * len(ys) * len(xs) < 1.3 * 1030 * 1349
    for size in (65, 200, 1025, 3000):
        tile, starts = tile_layout(size, 128, 16, 32)
        assert tile <= 128 and starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile - 16 for a, b in zip(starts, starts[1:]))  # every overlap >= 16


def test_checkpoint_settings_fill_in_what_the_user_did_not_set(cfg):
    """Settings without explicit keys take the checkpoint's values; explicit ones are kept."""
    from config import under_saved
    saved = cfg.replace("pre", stretch=True).as_dict()
    merged, taken = under_saved(load_config(user_path=None), saved, "x.pkl")
    assert merged.pre.stretch and ("pre", "stretch", True) in taken
    assert [t for t in taken if t[0] == "pre"] == [("pre", "stretch", True)]
    saved["post"]["threshold"] = "high"
    with pytest.raises(InputError, match=r"x.pkl: saved \[post\] threshold: expected a number"):
        under_saved(cfg, saved, "x.pkl")
