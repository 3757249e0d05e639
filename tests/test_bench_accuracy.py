"""bench/accuracy.py end to end on the bundled sample: a budgeted run, then an ensemble row."""
import json
import sys

import pandas as pd
import pytest

from tests.conftest import REPO, SAMPLE

sys.path.insert(0, str(REPO / "bench"))
import accuracy  # noqa: E402

TINY = """
[model]
model = {model}
encoder = plain
n_filter = 4
[train]
; tiny networks train faster in float32 than in bfloat16, even with AMX (docs/training.md)
amp = off
n_epoch = 2
n_batch = 4
n_worker = 0
n_cv_epoch = 0
n_ckpt_epoch = 1
[pre]
width = 64
"""


@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("unet", "camunet"):
        (tmp_path / f"{model}.ini").write_text(TINY.format(model=model))
    return tmp_path


def run(*args):
    return accuracy.main(["--data", str(SAMPLE), "--work", "work", "--results", "results.csv",
                          "--tune-images", "2", *args])


def test_rows_for_a_run_and_an_ensemble_of_two(bench):
    first = run("--config", "unet.ini", "--budget", "5")
    assert first["epochs"] == 2 and first["n_valid"] == 1  # 10 % of 8 images, at least one
    # [post] is tuned on images held out of training, and the row says on what grid
    data = bench / "work" / "unet" / "data"
    train_ids, tune_ids = ({p.name for p in (data / part).iterdir()} for part in ("train", "tune"))
    assert len(tune_ids) == 2 and not train_ids & tune_ids and len(train_ids) == 5
    assert json.loads(first["tune_grid"])["threshold"] == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert set(json.loads(first["tuned"])) == {"threshold", "policy", "min_confidence"}
    # the row names the machine it came from
    assert first["cpu"] and first["bf16_units"] and first["threads"] >= 1 and first["torch"].startswith("2.")
    run("--config", "camunet.ini", "--budget", "5")
    source_files = sorted(p.name for p in (bench / "work" / "unet" / "checkpoint").iterdir())
    ensemble = run("--from-run", "unet", "--from-run", "camunet", "--name", "both", "--valid-args=--no-tuned")

    table = pd.read_csv("results.csv")
    assert list(table["name"]) == ["unet", "camunet", "both"]
    assert table["config"].iloc[2] == "run unet + run camunet"
    # and with what valid.py arguments it was tuned and scored
    assert table["valid_args"].fillna("").tolist() == ["", "", "--no-tuned"]
    assert list(table["budget_min"]) == [5, 5, 5]  # a rescored row gives its source run's budget
    assert 0 <= ensemble["dsb"] <= 1 and ensemble["n_valid"] == 1
    # the ensemble row is tuned and scored in its own folder; the runs it reads are left as they were
    assert sorted(p.name for p in (bench / "work" / "unet" / "checkpoint").iterdir()) == source_files
    assert (bench / "work" / "both" / "checkpoint" / "unet-ckpt-2.pkl.post.json").is_file()
    scores = pd.read_csv(bench / "work" / "both" / "scores.csv")
    assert len(scores) == 1 and scores["dsb"].iloc[0] == pytest.approx(ensemble["dsb"])


def test_a_missing_config_file_is_an_error_not_a_row_of_the_others(bench):
    with pytest.raises(SystemExit, match="--config nosuch.ini: config file not found"):
        run("--config", "unet.ini", "--config", "nosuch.ini", "--budget", "5")
    (bench / "broken.ini").write_text("n_epoch = 2\n")  # a key before any [section]
    with pytest.raises(SystemExit, match="--config broken.ini: not a valid INI file"):
        run("--config", "unet.ini", "--config", "broken.ini", "--budget", "5")
    assert not (bench / "work").exists() and not (bench / "results.csv").exists()


def test_a_row_may_not_overwrite_the_run_it_scores(bench):
    run("--config", "unet.ini", "--budget", "5")
    with pytest.raises(SystemExit, match="overwrite"):
        run("--from-run", "unet", "--name", "unet")


def test_a_from_run_that_is_not_a_run_folder_is_one_line_and_writes_nothing(bench):
    with pytest.raises(SystemExit, match="--from-run nosuch: .*nosuch is not a benchmark run folder"):
        run("--from-run", "nosuch", "--name", "again")
    assert not (bench / "work" / "again").exists() and not (bench / "results.csv").exists()
