import configparser
import dataclasses
import re
import subprocess
import sys

import pytest

from config import DEFAULT_PATH, ConfigError, load_config
from tests.conftest import REPO


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_load_typed():
    cfg = load_config(user_path=None)
    assert cfg.train.n_batch == 8 and isinstance(cfg.train.n_batch, int)
    assert cfg.train.learn_rate == pytest.approx(1e-4)
    assert cfg.contour.precise is True
    assert cfg.model.weights_path is None and cfg.dataset.csv_file is None
    assert cfg.loss.terms == ("iou", "focal", "bce")
    assert cfg.loss.head_weights == (1.0, 1.0, 1.0)
    assert cfg.overrides == ()


def test_config_is_frozen():
    cfg = load_config(user_path=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.n_batch = 3


def test_every_default_key_has_a_comment():
    lines = DEFAULT_PATH.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+\s*=", line):
            assert lines[i - 1].startswith(";"), f"no comment above {line!r}"


def test_precedence_default_user_extra(tmp_path):
    user = write(tmp_path / "config.ini", "[train]\nn_batch = 4\nn_worker = 0\n")
    extra = write(tmp_path / "extra.ini", "[train]\nn_batch = 2\n[contour]\nprecise = no\n")
    cfg = load_config(extra, user_path=user)
    assert cfg.train.n_batch == 2          # --config wins over config.ini
    assert cfg.train.n_worker == 0         # config.ini wins over the defaults
    assert cfg.contour.precise is False
    assert cfg.train.n_epoch == 100        # untouched default
    described = "\n".join(cfg.describe_overrides())
    assert "[train] n_batch = 2" in described and str(extra) in described
    assert "[train] n_worker = 0" in described


def test_overriding_with_the_default_value_is_not_reported(tmp_path):
    user = write(tmp_path / "config.ini", "[train]\nn_batch = 8\n")
    assert load_config(user_path=user).overrides == ()


def test_user_file_in_working_directory_is_read(tmp_path, monkeypatch):
    write(tmp_path / "config.ini", "[model]\nmodel = unet\n")
    monkeypatch.chdir(tmp_path)
    assert load_config().model.model == "unet"


@pytest.mark.parametrize("text, expected", [
    ("[nosuch]\na = 1\n", r"unknown section \[nosuch\]"),
    ("[train]\nn_bach = 4\n", r"\[train\] unknown key 'n_bach'"),
    ("[train]\nn_batch = four\n", r"\[train\] n_batch: expected an integer, got 'four'"),
    ("[train]\nlearn_rate = fast\n", r"\[train\] learn_rate: expected a number"),
    ("[contour]\nprecise = maybe\n", r"\[contour\] precise: expected True or False"),
    ("[model]\nmodel = resunet\n", r"\[model\] model: 'resunet' is not one of unet, caunet, camunet"),
    ("[train]\nn_batch = 0\n", r"\[train\] n_batch: 0 is below the minimum 1"),
    ("[dataset]\ncv_ratio = 1.5\n", r"\[dataset\] cv_ratio: 1.5 is above the maximum 1"),
    ("[loss]\nterms = iou, dice\n", r"\[loss\] terms: 'dice' is not one of"),
    ("[loss]\nhead_weights = 1, 2\n", r"\[loss\] head_weights needs 3 numbers"),
    ("[pre]\nrescale_min = 3\n", r"\[pre\] rescale_min 3.0 is above rescale_max"),
    ("no section header\n", r"not a valid INI file"),
])
def test_bad_override_names_file_section_and_key(tmp_path, text, expected):
    path = write(tmp_path / "bad.ini", text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, user_path=None)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_extra_file():
    with pytest.raises(ConfigError, match="nope.ini: config file not found"):
        load_config("nope.ini", user_path=None)


def test_replace_checks_ranges():
    cfg = load_config(user_path=None)
    assert cfg.replace("train", n_batch=3).train.n_batch == 3
    with pytest.raises(ConfigError, match=r"\[train\] n_batch"):
        cfg.replace("train", n_batch=0)


def test_script_exits_2_with_one_line(tmp_path):
    bad = write(tmp_path / "bad.ini", "[train]\nn_bach = 4\n")
    result = subprocess.run([sys.executable, "preview.py", "--config", str(bad), "--out", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "n_bach" in result.stderr and str(bad) in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.ini")), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_config_loads(path):
    """The recipes and ablations the README and docs/results.md point users to are valid settings
    files on their own, and every setting in them is the one the loaded config takes."""
    cfg = load_config(path, user_path=None)
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(path)
    keys = [(section, key) for section in parser.sections() for key in parser[section]]
    assert keys
    for section, key in keys:
        assert cfg.source_of(section, key) == str(path), (section, key)
