"""atomic.py: whole-or-nothing files and folders, with the permissions the user's umask gives."""
import os
import stat

import numpy as np
import pytest

import split
from atomic import atomic_dir, atomic_path, check_output_folders
from config import InputError
from tests.conftest import disk, make_sample


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_and_folders_get_the_modes_of_a_plain_open_and_mkdir(tmp_path, umask, mask):
    umask(mask)
    with atomic_path(tmp_path / "out.csv") as tmp:
        tmp.write_text("a,b\n")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner").mkdir()
    with open(tmp_path / "plain.csv", "w") as fh:
        fh.write("a,b\n")
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "out.csv") == mode(tmp_path / "plain.csv") == 0o666 & ~mask
    assert mode(tmp_path / "folder") == mode(tmp_path / "plain") == 0o777 & ~mask


def test_split_folders_are_readable_by_the_group_under_umask_027(tmp_path, umask, cfg):
    for i in range(4):
        make_sample(tmp_path / "src", f"s{i}", np.zeros((8, 8), np.uint8), [disk((8, 8), (4, 4), 2)])
    umask(0o027)
    split.split_dataset(tmp_path / "src", tmp_path / "out", 0.5, 0, None, cfg.dataset)
    assert mode(tmp_path / "out" / "train") == mode(tmp_path / "out" / "valid") == 0o750


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["scores.csv"]


def test_atomic_dir_refuses_an_existing_folder_unless_told_to_replace_it(tmp_path):
    target = tmp_path / "masks"
    (target / "old").mkdir(parents=True)
    with pytest.raises(InputError, match=f"{target}: already exists"):
        with atomic_dir(target):
            raise AssertionError("the block must not run")
    with atomic_dir(target, replace=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".masks.tmp-") and os.listdir(tmp) == []
        (tmp / "new").mkdir()
        assert os.listdir(target) == ["old"]  # untouched until the block is done
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["masks"]


def test_atomic_dir_refuses_what_appeared_meanwhile_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(InputError, match="already exists"):
        with atomic_dir(target) as tmp:
            (tmp / "a.png").write_bytes(b"x")
            target.mkdir()  # another run was faster
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == []


def test_atomic_dir_leaves_nothing_and_keeps_the_old_folder_on_error(tmp_path):
    target = tmp_path / "crop"
    (target / "old").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "half").mkdir()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["crop"] and os.listdir(target) == ["old"]
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match="file: not a plain folder"):
        with atomic_dir(tmp_path / "file", replace=True):
            pass
    assert (tmp_path / "file").read_text() == "not a folder"


def test_check_output_folders(tmp_path):
    source = tmp_path / "data" / "stage1_train"
    source.mkdir(parents=True)
    check_output_folders(source, [tmp_path / "data" / "train"], force=False)
    with pytest.raises(InputError, match="lies inside the source"):
        check_output_folders(source, [source / "train"], force=False)
    with pytest.raises(InputError, match="holds the source"):
        check_output_folders(source, [tmp_path / "data"], force=True)
    (tmp_path / "data" / "valid").mkdir()
    with pytest.raises(InputError, match="valid: already exists; use --force"):
        check_output_folders(source, [tmp_path / "data" / "train", tmp_path / "data" / "valid"], force=False)
    check_output_folders(source, [tmp_path / "data" / "train", tmp_path / "data" / "valid"], force=True)
    (tmp_path / "data" / "link").symlink_to(source)
    with pytest.raises(InputError, match="holds the source"):  # a link to the source is the source
        check_output_folders(source, [tmp_path / "data" / "link"], force=True)
