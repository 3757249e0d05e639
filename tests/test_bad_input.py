"""Bad input through the real command line: one line on stderr naming the file, folder or key, a
non-zero exit, and nothing written (no CSV, no split or tile folder, no figure, no temporary file).

Every script runs in a subprocess with the repository's python, in a fresh working folder (so no
./config.ini applies) with PYTHONPATH pointing at the repository, as a user would run it.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, disk, make_sample, write_png

SHAPE = (24, 24)
# tiny runs: no decode cache (so nothing at all may be written), small crops, the tiny model
SETTINGS = """
[model]
model = camunet
encoder = plain
n_filter = 4
[train]
; tiny networks train faster in float32 than in bfloat16, even with AMX (docs/training.md)
amp = off
n_batch = 2
n_cv_epoch = 1
checkpoint_dir = ckpt
log_dir = runs
[pre]
width = 16
[dataset]
root = data
cv_ratio = 0.5
cache_dir =
"""


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def snapshot(root: Path) -> dict[str, float]:
    """Every file and folder under `root` (hidden ones included) with its modification time."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = path.lstat().st_mtime_ns
    return found


def assert_refused(result: subprocess.CompletedProcess, before: dict, work: Path, *names: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert snapshot(work) == before  # nothing new, nothing changed, nothing left behind


@pytest.fixture
def work(tmp_path):
    """tmp_path with data/stage1_train (three good 24x24 samples a, b, c), meta.csv and ok.ini."""
    root = tmp_path / "data" / "stage1_train"
    for i, name in enumerate("abc"):
        make_sample(root, name, np.full(SHAPE + (3,), 40 * i, np.uint8),
                    [disk(SHAPE, (6, 6), 4), disk(SHAPE, (16, 15), 5)])
    (tmp_path / "meta.csv").write_text("image_id,source\na,x\nb,x\nc,y\n")
    (tmp_path / "ok.ini").write_text(SETTINGS)
    return tmp_path


def damage(work: Path, kind: str) -> str:
    """Spoil sample b in one way; returns the path (relative to `work`) the error must name."""
    folder = Path("data/stage1_train/b")
    if kind == "corrupt image":
        (work / folder / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a PNG")
        return str(folder / "images" / "b.png")
    if kind == "mask of the wrong size":
        write_png(work / folder / "masks" / "m009.png", np.full((10, 12), 255, np.uint8))
        return str(folder / "masks" / "m009.png")
    if kind == "missing images":
        for path in (work / folder / "images").iterdir():
            path.unlink()
        (work / folder / "images").rmdir()
        return str(folder)
    if kind == "stray file in masks":
        (work / folder / "masks" / "m009.txt").write_text("outline of nucleus 9")
        return str(folder / "masks" / "m009.txt")
    if kind == "label image in masks":
        labels = disk(SHAPE, (6, 18), 3).astype(np.uint16) + 2 * disk(SHAPE, (18, 6), 3).astype(np.uint16)
        write_png(work / folder / "masks" / "m009.png", labels)
        return str(folder / "masks" / "m009.png")
    raise ValueError(kind)


# each command writes something (a split, tiles and a CSV, a figure) when the input is good
COMMANDS = {
    "split.py": ["data/stage1_train", "--out", "out", "--ratio", "0.5", "--csv", "", "--config", "ok.ini"],
    "crop.py": ["data/stage1_train", "--step", "12", "--width", "12", "--out", "tiles", "--csv", "meta.csv",
                "--csv-out", "tiles.csv", "--config", "ok.ini"],
    "preview.py": ["data/stage1_train", "--out", "pic", "--n", "2", "--config", "ok.ini"],
}
# split.py links files without decoding them, so only damage it can see without decoding is its case
CASES = [(kind, script) for kind in ("corrupt image", "mask of the wrong size", "label image in masks")
         for script in ("crop.py", "preview.py")]
CASES += [(kind, script) for kind in ("missing images", "stray file in masks") for script in COMMANDS]


def test_the_commands_write_their_outputs_on_good_input(work):
    for script, args in COMMANDS.items():
        result = run_script(script, args, work)
        assert result.returncode == 0 and result.stderr == "", (script, result.stderr)
    assert {p.name for p in work.iterdir()} >= {"out", "tiles", "tiles.csv", "pic"}


@pytest.mark.parametrize("kind, script", CASES)
def test_bad_sample_is_refused_and_nothing_is_written(work, kind, script):
    name = damage(work, kind)
    before = snapshot(work)
    assert_refused(run_script(script, COMMANDS[script], work), before, work, name)


def test_train_refuses_a_corrupt_image_with_one_line_and_no_output(work):
    (work / "data" / "stage1_train").rename(work / "data" / "train")
    (work / "data" / "train" / "b" / "images" / "b.png").write_bytes(b"not a png")
    before = snapshot(work)
    result = run_script("train.py", TORCH_COMMANDS["train.py"], work)
    assert_refused(result, before, work, "data/train/b/images/b.png")


CONFIG_ERRORS = {
    "wrong type": ("[train]\nn_batch = four\n", "[train] n_batch"),
    "unknown key": ("[dataset]\ncv_ration = 0.2\n", "cv_ration"),
}
TORCH_COMMANDS = {
    "train.py": ["--no-resume", "--epoch", "1", "--quiet", "--config", "ok.ini"],
    "valid.py": ["--dataset", "test", "--csv", "sub.csv", "--config", "ok.ini"],
}
# every problem with every torch-free script; one each for the scripts that take seconds to import torch
CONFIG_CASES = [(script, problem) for script in COMMANDS for problem in CONFIG_ERRORS]
CONFIG_CASES += [("train.py", "wrong type"), ("valid.py", "unknown key")]


@pytest.mark.parametrize("script, problem", CONFIG_CASES)
def test_bad_settings_are_refused_and_nothing_is_written(work, script, problem):
    text, key = CONFIG_ERRORS[problem]
    (work / "bad.ini").write_text(text)
    args = [a if a != "ok.ini" else "bad.ini" for a in {**COMMANDS, **TORCH_COMMANDS}[script]]
    before = snapshot(work)
    assert_refused(run_script(script, args, work), before, work, "bad.ini", key)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained checkpoint of the tiny model (prediction needs weights, not good ones)."""
    from config import load_config
    from model import build_model
    from model.checkpoint import save_checkpoint
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "tiny.ini").write_text(SETTINGS)
    cfg = load_config(folder / "tiny.ini", user_path=None)
    return save_checkpoint(folder / "tiny.pkl", build_model(cfg.model), cfg, update_pointer=False)


def test_valid_on_an_empty_test_folder(work, checkpoint):
    (work / "data" / "test").mkdir()
    before = snapshot(work)
    result = run_script("valid.py", [str(checkpoint), "--dataset", "test", "--config", "ok.ini",
                                     "--csv", "sub.csv"], work)
    assert_refused(result, before, work, "data/test")


def test_valid_with_a_garbage_checkpoint(work):
    (work / "data" / "stage1_train").rename(work / "data" / "test")
    (work / "garbage.pkl").write_bytes(os.urandom(3000))
    before = snapshot(work)
    result = run_script("valid.py", ["garbage.pkl", "--dataset", "test", "--config", "ok.ini",
                                     "--csv", "sub.csv"], work)
    assert_refused(result, before, work, "garbage.pkl")


def test_an_interrupted_training_run_leaves_whole_checkpoints_and_resumes(work):
    """Ctrl-C mid-run: one line, exit 130, no temporary file, and the latest checkpoint resumes."""
    import signal
    import time
    from model.checkpoint import latest_checkpoint, read_checkpoint
    (work / "data" / "stage1_train").rename(work / "data" / "train")
    # one training image: 32-pixel crops keep batch norm's deepest maps above one value
    (work / "long.ini").write_text(SETTINGS.replace("n_cv_epoch = 1", "n_cv_epoch = 1\nn_ckpt_epoch = 1\nn_worker = 0")
                                   .replace("width = 16", "width = 32"))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--epoch", "100000", "--quiet",
                             "--config", "long.ini"], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 240
    while not (work / "ckpt" / "ckpt-2.pkl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted; files already written are complete, "
                                           "nothing is half-written"]
    folder = work / "ckpt"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    state = read_checkpoint(latest_checkpoint(folder))
    assert state["epoch"] >= 2 and not state["run"]["finished"]
    result = run_script("train.py", ["--epoch", str(state["epoch"] + 1), "--quiet", "--config", "long.ini"], work)
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(latest_checkpoint(folder))["epoch"] == state["epoch"] + 1
