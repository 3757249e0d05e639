"""Label images: 0 background, 1..N nuclei, uint16 up to 65535 nuclei and uint32 above, TIFF and
PNG, written atomically, with the names of each challenge."""
import os

import cv2
import numpy as np
import pytest
import tifffile

from config import InputError
from labelio import label_name, sequential_labels, write_labels


def grid_labels(n: int, shape=(300, 300)) -> np.ndarray:
    """n one-pixel nuclei with ids 1..n (n below the pixel count), the rest background."""
    labels = np.zeros(shape, np.int64)
    labels.ravel()[:n] = np.arange(1, n + 1)
    return labels


def test_ids_are_renumbered_in_order():
    labels = np.array([[0, 40, 40], [7, 0, 1000]], np.int32)
    out = sequential_labels(labels)
    assert out.dtype == np.uint16
    assert out.tolist() == [[0, 2, 2], [1, 0, 3]]
    # no background at all: the smallest id still becomes 1
    assert sequential_labels(np.array([[5, 6]])).tolist() == [[1, 2]]


@pytest.mark.parametrize("n, dtype", [(65535, np.uint16), (65536, np.uint32)])
def test_type_switches_above_65535_nuclei(tmp_path, n, dtype):
    labels = grid_labels(n)
    assert sequential_labels(labels).dtype == dtype
    path = write_labels(tmp_path / "many_label.tiff", labels)
    back = tifffile.imread(path)
    assert back.dtype == dtype and np.array_equal(back, labels)


def test_png_round_trip_through_opencv(tmp_path):
    labels = grid_labels(300, (40, 50))
    labels[20:30, 20:30] = 70000          # a big id, renumbered to 301
    path = write_labels(tmp_path / "a_label.png", labels)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.max() == 301
    assert np.array_equal(back, sequential_labels(labels))


def test_png_refuses_more_than_65535_nuclei(tmp_path):
    with pytest.raises(InputError, match="65536 nuclei do not fit a 16-bit PNG"):
        write_labels(tmp_path / "many.png", grid_labels(65536))
    assert list(tmp_path.iterdir()) == []


def test_tiff_round_trip_and_no_leftovers(tmp_path):
    labels = np.zeros((32, 48), np.int32)
    labels[3:9, 4:12] = 2
    labels[20:30, 30:40] = 5
    path = write_labels(tmp_path / "sub" / "mask0007.tif", labels)
    back = tifffile.imread(path)
    assert back.dtype == np.uint16 and back.shape == (32, 48)
    assert np.array_equal(back, np.where(labels == 2, 1, np.where(labels == 5, 2, 0)))
    assert os.listdir(tmp_path / "sub") == ["mask0007.tif"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_labels(tmp_path / "x.tif", np.ones((4, 4), np.uint8))
    old = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_labels(path, np.zeros((4, 4), np.uint8))
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["x.tif"]


def test_bad_suffix_and_bad_labels(tmp_path):
    with pytest.raises(InputError, match="written as .tif, .tiff or .png"):
        write_labels(tmp_path / "x.jpg", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=">= 0"):
        sequential_labels(np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="integer"):
        sequential_labels(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("name, naming, fmt, expected", [
    ("t0003.tif", "auto", "tif", "mask0003.tif"),
    ("t012.tif", "mask", "png", "mask012.png"),
    ("cell_00012.png", "auto", "tif", "cell_00012_label.tiff"),
    ("cell_00012.tiff", "label", "png", "cell_00012_label.png"),
    ("t0003.tif", "label", "tif", "t0003_label.tiff"),
    ("img.jpg", "same", "tif", "img.tif"),
])
def test_label_names(name, naming, fmt, expected):
    assert label_name(name, naming, fmt) == expected


def test_label_name_errors():
    with pytest.raises(InputError, match="t<digits>"):
        label_name("cell.png", "mask")
    with pytest.raises(InputError, match="not one of tif, png"):
        label_name("cell.png", "label", "jpg")
