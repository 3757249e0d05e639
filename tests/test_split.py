"""split.py: hard links, the seeded split, groups, the CSV whitelist, refusals, --force and the
copy fallback."""
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import crop
import split
from config import InputError
from dataset import split_ids
from tests.conftest import REPO, disk, make_sample


@pytest.fixture
def source(tmp_path):
    """20 tiny samples s00..s19 (8x8 grey image, one disk mask) in tmp_path/data/stage1_train."""
    root = tmp_path / "data" / "stage1_train"
    for i in range(20):
        make_sample(root, f"s{i:02d}", np.full((8, 8), i, np.uint8), [disk((8, 8), (4, 4), 2)])
    return root


def ids_in(folder):
    return sorted(os.listdir(folder))


def test_hard_links_share_inodes_and_counts_follow_split_ids(source, tmp_path, cfg, capsys):
    out = tmp_path / "split"
    n_train, n_valid = split.split_dataset(source, out, 0.25, 3, None, cfg.dataset)
    train_ids, valid_ids = split_ids(ids_in(source), 0.25, 3)
    assert (n_train, n_valid) == (len(train_ids), len(valid_ids)) == (15, 5)
    assert ids_in(out / "train") == train_ids and ids_in(out / "valid") == valid_ids
    assert ids_in(out) == ["train", "valid"]  # no temporary folder left
    for part, ids in (("train", train_ids), ("valid", valid_ids)):
        for sample_id in ids:
            for rel in (f"images/{sample_id}.png", "masks/m000.png"):
                linked, original = os.stat(out / part / sample_id / rel), os.stat(source / sample_id / rel)
                assert linked.st_ino == original.st_ino and linked.st_nlink == original.st_nlink == 2
    printed = capsys.readouterr().out
    assert "hard-linked 40 files" in printed and "copying" not in printed


def test_same_seed_same_split_other_seed_another(source, tmp_path, cfg):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        split.split_dataset(source, tmp_path / name, 0.3, seed, None, cfg.dataset)
    assert ids_in(tmp_path / "a" / "valid") == ids_in(tmp_path / "b" / "valid")
    assert ids_in(tmp_path / "a" / "valid") != ids_in(tmp_path / "c" / "valid")
    assert len(ids_in(tmp_path / "c" / "valid")) == 6


def test_csv_whitelist_and_its_filters_choose_the_samples(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./config.ini from the working copy
    csv = tmp_path / "white.csv"
    lines = ["image_id,source"] + [f"s{i:02d},{'a' if i < 8 else 'b'}" for i in range(12)]
    csv.write_text("\n".join(lines) + "\n")
    extra = tmp_path / "only_a.ini"
    extra.write_text("[dataset]\nsource = a\n")
    split.main([str(source), "--out", str(tmp_path / "out"), "--csv", str(csv), "--config", str(extra),
                "--ratio", "0.25", "--seed", "5"])
    train_ids, valid_ids = split_ids([f"s{i:02d}" for i in range(8)], 0.25, 5)
    assert ids_in(tmp_path / "out" / "train") == train_ids
    assert ids_in(tmp_path / "out" / "valid") == valid_ids
    printed = capsys.readouterr().out
    assert "[dataset] source = a" in printed and "kept 8 of 20 samples" in printed


def test_existing_split_is_refused_untouched(source, tmp_path):
    out = tmp_path / "data"
    (out / "train").mkdir()
    (out / "train" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "split.py", str(source), "--ratio", "0.2", "--seed", "0",
                             "--csv", ""], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out / "train") in lines[0]
    assert ids_in(out) == ["stage1_train", "train"]  # no valid/, no temporary folder
    assert ids_in(out / "train") == ["keep.txt"]


def test_force_replaces_train_and_valid_only(source, tmp_path, cfg):
    out = tmp_path / "data"
    for name in ("train", "valid", "other"):
        (out / name / "old").mkdir(parents=True)
    with pytest.raises(InputError, match="already exists"):
        split.split_dataset(source, out, 0.2, 0, None, cfg.dataset)
    split.split_dataset(source, out, 0.2, 0, None, cfg.dataset, force=True)
    train_ids, valid_ids = split_ids(ids_in(source), 0.2, 0)
    assert ids_in(out / "train") == train_ids and ids_in(out / "valid") == valid_ids
    assert ids_in(out / "other") == ["old"]
    assert len(ids_in(source)) == 20


def test_copy_fallback_when_links_fail(source, tmp_path, cfg, monkeypatch, capsys):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))

    monkeypatch.setattr(os, "link", no_link)
    assert split.split_dataset(source, tmp_path / "out", 0.2, 0, None, cfg.dataset) == (16, 4)
    printed = capsys.readouterr().out
    assert printed.count("copying instead") == 1 and "copied 40 files" in printed
    assert "hard-linked" not in printed
    copied = tmp_path / "out" / "train" / "s00" / "images" / "s00.png"
    original = source / "s00" / "images" / "s00.png"
    assert copied.read_bytes() == original.read_bytes()
    assert os.stat(copied).st_ino != os.stat(original).st_ino


def test_copy_flag_copies_without_trying_links(source, tmp_path, cfg, capsys):
    split.split_dataset(source, tmp_path / "out", 0.2, 0, None, cfg.dataset, copy=True)
    printed = capsys.readouterr().out
    assert "copied 40 files" in printed and "copying instead" not in printed
    assert os.stat(source / "s00" / "masks" / "m000.png").st_nlink == 1


def test_interrupted_run_leaves_no_half_split(source, tmp_path, cfg, monkeypatch):
    calls = []

    def copy_then_stop(src, dst):
        calls.append(src)
        if len(calls) == 25:  # in the middle of valid/, after train/ is complete
            raise KeyboardInterrupt
        shutil.copyfile(src, dst)

    monkeypatch.setattr(shutil, "copy2", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        split.split_dataset(source, tmp_path / "out", 0.5, 0, None, cfg.dataset, copy=True)
    assert ids_in(tmp_path / "out") == []


def test_refuses_sources_inside_the_split_and_splits_inside_the_source(source, tmp_path, cfg):
    out = source.parent
    split.split_dataset(source, out, 0.2, 0, None, cfg.dataset)
    for part in ("train", "valid"):
        with pytest.raises(InputError, match=f"{out / part}: this output folder holds the source"):
            split.split_dataset(out / part, out, 0.2, 0, None, cfg.dataset, force=True)
    with pytest.raises(InputError, match="lies inside the source"):
        split.split_dataset(source, source, 0.2, 0, None, cfg.dataset)
    assert ids_in(source) == [f"s{i:02d}" for i in range(20)]


def test_refuses_ratios_that_leave_a_side_empty(source, tmp_path, cfg):
    with pytest.raises(InputError, match="--ratio 0"):
        split.split_dataset(source, tmp_path / "out", 0.0, 0, None, cfg.dataset)
    single = tmp_path / "single"
    shutil.copytree(source / "s00", single / "s00")
    with pytest.raises(InputError, match="cannot be split"):
        split.split_dataset(single, tmp_path / "out", 0.9, 0, None, cfg.dataset)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiled(tmp_path):
    """tmp_path/crop: crop.py's 100x100 tiles (step 50) of six 200x200 images p0..p5, nine tiles each,
    every tile with one nucleus in it; tmp_path/meta.csv: the CSV crop.py wrote for them."""
    src = tmp_path / "src"
    centres = [(y, x) for y in (20, 80, 180) for x in (20, 80, 180)]  # one in each tile of a 3x3 grid
    for i in range(6):
        make_sample(src, f"p{i}", np.full((200, 200), 30 * i, np.uint8),
                    [disk((200, 200), c, 6) for c in centres])
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id\n" + "".join(f"p{i}\n" for i in range(6)))
    assert crop.crop_dataset(src, tmp_path / "crop", 100, 50, csv_path=csv) == (54, 0)
    return tmp_path / "crop", csv


def parents(folder):
    return {name.split("_")[0] for name in ids_in(folder)}


@pytest.mark.parametrize("seed", range(4))
def test_tiles_of_one_image_never_straddle_the_split(tiled, tmp_path, cfg, seed):
    crops, _ = tiled
    n_train, n_valid = split.split_dataset(crops, tmp_path / "out", 0.34, seed, None, cfg.dataset)
    train, valid = parents(tmp_path / "out" / "train"), parents(tmp_path / "out" / "valid")
    assert not train & valid and train | valid == {f"p{i}" for i in range(6)}
    assert (n_train, n_valid) == (36, 18)  # two whole images of six: 18 tiles, a third
    assert (tmp_path / "out" / "valid" / f"{min(valid)}_0_0" / "group.txt").read_text() == f"{min(valid)}\n"


def test_without_group_files_the_csv_parent_ids_keep_tiles_together(tiled, tmp_path, cfg):
    crops, csv = tiled
    for path in crops.glob("*/group.txt"):  # tiles cut before crop.py wrote group files
        path.unlink()
    table = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("image_id")
    split.split_dataset(crops, tmp_path / "out", 0.34, 0, table, cfg.dataset)
    train, valid = parents(tmp_path / "out" / "train"), parents(tmp_path / "out" / "valid")
    assert not train & valid and len(valid) == 2
    # without the CSV every tile is on its own, and the split cuts through images
    split.split_dataset(crops, tmp_path / "loose", 0.34, 0, None, cfg.dataset)
    assert parents(tmp_path / "loose" / "train") & parents(tmp_path / "loose" / "valid")


def test_one_group_cannot_be_split(tiled, tmp_path, cfg):
    crops, _ = tiled
    for path in crops.glob("*/group.txt"):
        path.write_text("one sequence\n")
    with pytest.raises(InputError, match=r"54 sample\(s\) in 1 group\(s\) cannot be split"):
        split.split_dataset(crops, tmp_path / "out", 0.3, 0, None, cfg.dataset)
    assert not (tmp_path / "out").exists()
