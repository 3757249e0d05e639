"""valid.py and predict.py under torchrun on the CPU (gloo, two processes) against one process, on
seven of the bundled sample's images (an odd count: the processes predict four and three): the
CSV files, label images and mask folders must be the same bytes, each line printed once."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
import valid
from config import run_main
from distributed import World, interleave
from tests.conftest import REPO, SAMPLE, train_on_sample
from tests.test_distributed import free_port

# A tiny CAUNet trained for ten short epochs: enough to find a few nuclei in some images and none
# in others, so the merged CSV has images of different row counts to put in order.
TRAIN_SETTINGS = """
[model]
model = caunet
encoder = plain
n_filter = 4
[train]
amp = off
n_batch = 4
n_worker = 0
n_epoch = 10
n_cv_epoch = 10
n_ckpt_epoch = 10
learn_rate = 0.01
checkpoint_dir = ckpt
log_dir = runs
[pre]
width = 64
[dataset]
root = trainset
cache_dir = cache
"""
PREDICT_SETTINGS = """
[valid]
test_time_augment = False
[dataset]
root = data
cache_dir = cache
"""
N_IMAGES = 7


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A trained checkpoint (ckpt/best.pkl), a DSB-layout test set data/test of seven sample
    images, and a folder `images` of the same images (one in a subfolder) plus a corrupt file."""
    work = tmp_path_factory.mktemp("distributed_predict")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads on a busy machine train ten times slower
    try:
        train_on_sample(work, TRAIN_SETTINGS, root="trainset")
    finally:
        torch.set_num_threads(threads)
    (work / "settings.ini").write_text(PREDICT_SETTINGS)
    ids = sorted(p.name for p in SAMPLE.iterdir())[:N_IMAGES]
    (work / "data" / "test").mkdir(parents=True)
    (work / "images" / "sub").mkdir(parents=True)
    for n, sample_id in enumerate(ids):
        (work / "data" / "test" / sample_id).symlink_to(SAMPLE / sample_id)
        folder = work / "images" / ("sub" if n == 3 else "")
        (folder / f"{sample_id}.png").symlink_to(SAMPLE / sample_id / "images" / f"{sample_id}.png")
    (work / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return work


def one_process(work: Path, main, argv: list[str], monkeypatch) -> int:
    """main(argv) in this process, in `work`, on one thread like each torchrun process (so both
    compute in the same order); its exit status."""
    monkeypatch.chdir(work)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_main(main, argv)
        return 0
    except SystemExit as exc:
        return exc.code
    finally:
        torch.set_num_threads(threads)


def two_processes(work: Path, script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`script` under torchrun with two CPU processes (gloo), one thread each, in `work`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(REPO / script), *argv], cwd=work, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_share_and_interleave_are_inverse():
    for n_items in range(10):
        items = list(range(n_items))
        for size in range(1, 5):
            parts = [World(rank=r, size=size).share(items) for r in range(size)]
            assert sorted(sum(parts, [])) == items
            assert interleave(parts) == items


def test_valid_under_torchrun_writes_the_files_of_one_process(work, monkeypatch):
    def argv(tag):
        return ["ckpt/best.pkl", "--config", "settings.ini", "--dataset", "test", "--csv", f"{tag}/sub.csv",
                "--scores", f"{tag}/scores.csv", "--dice-csv", f"{tag}/dice.csv", "--labels", f"{tag}/labels",
                "--masks", f"{tag}/masks"]

    assert one_process(work, valid.main, argv("one"), monkeypatch) == 0
    result = two_processes(work, "valid.py", argv("two"))
    assert result.returncode == 0, result.stdout

    one, two = files_of(work / "one"), files_of(work / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name] == two[name], name
    rows = one["sub.csv"].decode().splitlines()
    assert len(rows) - 1 > N_IMAGES  # some image has several nuclei: the merge orders rows of unequal counts
    assert len(one["scores.csv"].decode().splitlines()) == N_IMAGES + 1
    assert sum(name.startswith("labels/") for name in one) == N_IMAGES
    assert not [p for p in (work / "two").rglob(".*")]  # no temporary file or folder left
    # one set of lines: the table, the means and each file once, from rank 0
    out = result.stdout
    assert "x 2 processes (images shared)" in out
    assert out.count("mean: dsb") == 1 and out.count("wrote two/sub.csv") == 1 and out.count("[post]") == 1
    assert out.count(f"{N_IMAGES} test images") == 1


def test_predict_under_torchrun_writes_the_files_of_one_process(work, monkeypatch):
    def argv(tag):
        return ["-i", "images", "-o", f"{tag}/labels", "ckpt/best.pkl", "--config", "settings.ini",
                "--recursive", "--dice-csv", f"{tag}/dice.csv"]

    # the corrupt file: reported, the other label images written, exit status 2
    assert one_process(work, predict.main, argv("pone"), monkeypatch) == 2
    result = two_processes(work, "predict.py", argv("ptwo"))
    assert result.returncode != 0, result.stdout

    one, two = files_of(work / "pone"), files_of(work / "ptwo")
    assert sorted(one) == sorted(two)
    assert sum(name.startswith("labels/") for name in one) == N_IMAGES
    assert any(name.startswith("labels/sub/") for name in one)
    for name in one:
        assert one[name] == two[name], name
    out = result.stdout
    assert out.count("broken.png") == 1, out  # reported once, by rank 0
    assert out.count(f"error: 1 of {N_IMAGES + 1} input files could not be read") == 1
    summary = [line for line in out.splitlines() if "image(s) -> ptwo/labels" in line]
    assert len(summary) == 1 and summary[0].startswith(f"{N_IMAGES} image(s)") and "1 unreadable" in summary[0]
    assert "peak RSS" in summary[0] and "(the largest process's)" in summary[0]


@pytest.mark.slow
def test_tune_under_torchrun_saves_the_thresholds_of_one_process(work, monkeypatch):
    """--tune gathers every image's maps on rank 0, so the tuned file is the same; an unlabelled
    image stops both processes with one error line."""
    for tag in ("tone", "ttwo"):
        (work / tag).mkdir()
        shutil.copy(work / "ckpt" / "best.pkl", work / tag / "best.pkl")

    def argv(tag):
        return [f"{tag}/best.pkl", "--config", "settings.ini", "--dataset", "test", "--tune", "--keep-policy"]

    assert one_process(work, valid.main, argv("tone"), monkeypatch) == 0
    result = two_processes(work, "valid.py", argv("ttwo"))
    assert result.returncode == 0, result.stdout
    assert (work / "tone" / "best.pkl.post.json").read_bytes() == (work / "ttwo" / "best.pkl.post.json").read_bytes()
    assert result.stdout.count("Best mean DSB score") == 1

    # an image without masks, second in order so that rank 1 meets it
    unlabelled = work / "data" / "unlabelled"
    unlabelled.mkdir(parents=True)
    for n, sample in enumerate(sorted((work / "data" / "test").iterdir())[:3]):
        if n == 1:
            (unlabelled / sample.name / "images").mkdir(parents=True)
            shutil.copy(sample / "images" / f"{sample.name}.png", unlabelled / sample.name / "images")
        else:
            (unlabelled / sample.name).symlink_to(sample.resolve())
    result = two_processes(work, "valid.py", ["ttwo/best.pkl", "--config", "settings.ini", "--dataset",
                                              "unlabelled", "--tune"])
    assert result.returncode != 0
    assert result.stdout.count("--tune needs labelled images") == 1, result.stdout
