"""Size normalisation end to end: a checkpoint trained with [pre] size_norm predicts size-normalised
in training's validation pass and in valid.py, with the same score."""

import pytest

import valid
from model.checkpoint import read_checkpoint
from tests.conftest import train_on_sample

SETTINGS = """
[model]
model = unet
encoder = plain
n_filter = 8
[train]
n_batch = 4
n_worker = 0
n_cv_epoch = 2
n_epoch = 10
checkpoint_dir = ckpt
log_dir = runs
learn_rate = 0.003
amp = off
[pre]
width = 96
size_norm = True
nucleus_diameter = 24
[dataset]
root = mydata
cv_ratio = 0.25
cache_dir = cache
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_on_sample(tmp_path_factory.mktemp("sized"), SETTINGS)


def test_training_score_of_a_size_normalised_checkpoint_equals_valid(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    best = read_checkpoint(trained / "ckpt" / "best.pkl")["scores"]["valid_score"]
    assert best > 0
    capsys.readouterr()
    # without the training config: size_norm and nucleus_diameter come from the checkpoint
    means = valid.main(["ckpt/best.pkl", "--dataset", "valid", "--no-tuned", "--no-figures"])
    assert means["dsb"] == pytest.approx(best, abs=1e-6)
    out = capsys.readouterr().out
    assert "[pre] size_norm = True" in out and "[pre] nucleus_diameter = 24.0" in out
    assert "size normalisation (best.pkl): images rescaled by" in out


def test_a_nucleus_diameter_that_contradicts_the_checkpoint_is_refused(trained, monkeypatch):
    from config import InputError
    monkeypatch.chdir(trained)
    (trained / "other.ini").write_text("[pre]\nnucleus_diameter = 30\n")
    with pytest.raises(InputError, match=r"other.ini: \[pre\] nucleus_diameter = 30.0, but ckpt/best.pkl was "
                                         r"trained with 24.0"):
        valid.main(["ckpt/best.pkl", "--dataset", "valid", "--config", "other.ini", "--no-figures"])


def test_size_norm_with_the_resize_to_width_is_refused_in_one_line(tmp_path):
    from config import ConfigError, load_config
    (tmp_path / "both.ini").write_text("[pre]\nsize_norm = True\n[valid]\npred_orig_size = False\n")
    with pytest.raises(ConfigError, match=r"both.ini: \[pre\] size_norm .* needs \[valid\] pred_orig_size = True"):
        load_config(tmp_path / "both.ini", user_path=None)
    (tmp_path / "range.ini").write_text("[pre]\nnucleus_diameter = 2\n")
    with pytest.raises(ConfigError, match=r"range.ini: \[pre\] nucleus_diameter: 2.0 is below the minimum 4"):
        load_config(tmp_path / "range.ini", user_path=None)
