"""Readers: image formats, mask composition, bad input, the real sample and the decode cache."""
import numpy as np
import pytest

import dataset.io as dio
from config import InputError
from dataset.io import (compose_labels, list_samples, read_image, read_mask, read_sample, read_sample_cached,
                        sample_files)
from tests.conftest import SAMPLE, disk, make_sample, write_png


def test_image_formats_become_rgb_uint8(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 10  # blue in OpenCV's order
    assert read_image(write_png(tmp_path / "rgb.png", bgr))[0, 0].tolist() == [0, 0, 10]
    bgra = np.dstack([bgr, np.full((4, 5), 255, np.uint8)])
    assert read_image(write_png(tmp_path / "rgba.png", bgra)).shape == (4, 5, 3)
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = read_image(write_png(tmp_path / "gray.png", gray))
    assert out.shape == (4, 5, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    deep = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 1000 + 500)
    out16 = read_image(write_png(tmp_path / "deep.png", deep))
    assert out16.dtype == np.uint8 and out16.min() == 0 and out16.max() == 255


def test_unreadable_files_name_the_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png: not a readable image"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.png: not a readable image"):
        read_image(empty)


def test_overlaps_go_to_the_earlier_mask_and_holes_fill():
    a = np.zeros((9, 9), bool)
    a[1:6, 1:6] = True
    a[3, 3] = False                       # a hole
    b = np.zeros((9, 9), bool)
    b[4:8, 4:8] = True                    # overlaps a at [4:6, 4:6]
    labels = compose_labels([a, b], a.shape, fill_holes=True)
    assert labels[3, 3] == 1 and labels[5, 5] == 1 and labels[7, 7] == 2
    assert compose_labels([a, b], a.shape, fill_holes=False)[3, 3] == 0
    assert compose_labels([b, a], a.shape, fill_holes=True)[5, 5] == 1  # b is first now


def test_sample_with_and_without_masks(tmp_path):
    image = np.full((20, 30, 3), 40, np.uint8)
    masks = [disk((20, 30), (6, 6), 3), disk((20, 30), (12, 20), 4)]
    labels = read_sample(sample_files(make_sample(tmp_path, "a", image, masks)))[1]
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    assert (labels == 2).sum() == masks[1].sum()
    test_image, test_labels = read_sample(sample_files(make_sample(tmp_path, "t", image, None)))
    assert test_labels is None and test_image.shape == (20, 30, 3)


@pytest.mark.parametrize("damage, message", [
    ("no_images", "no images/ folder"),
    ("two_images", "expected exactly one image, found 2"),
    ("mask_size", "mask size 10x10 differs from its image size 30x20"),
    ("empty_mask", "mask is empty"),
    ("corrupt_mask", "not a readable image"),
])
def test_bad_sample_folders(tmp_path, damage, message):
    image = np.zeros((20, 30, 3), np.uint8)
    folder = make_sample(tmp_path, "s", image, [disk((20, 30), (8, 8), 3)])
    if damage == "no_images":
        (folder / "images" / "s.png").unlink()
        (folder / "images").rmdir()
    elif damage == "two_images":
        write_png(folder / "images" / "extra.png", image)
    elif damage == "mask_size":
        write_png(folder / "masks" / "small.png", np.full((10, 10), 255, np.uint8))
    elif damage == "empty_mask":
        write_png(folder / "masks" / "zero.png", np.zeros((20, 30), np.uint8))
    elif damage == "corrupt_mask":
        (folder / "masks" / "junk.png").write_text("junk")
    with pytest.raises(InputError, match=message):
        read_sample(sample_files(folder))


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(InputError, match="dataset folder not found"):
        list_samples(tmp_path / "nope")
    with pytest.raises(InputError, match="holds no sample folders"):
        list_samples(tmp_path)


def test_real_sample_reads():
    samples = list_samples(SAMPLE)
    assert len(samples) == 8
    for files in samples:
        image, labels = read_sample(files)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert labels.shape == image.shape[:2]
        assert len(np.unique(labels)) - 1 == len(files.mask_paths)


def test_cache_hits_and_invalidates(tmp_path, monkeypatch):
    folder = make_sample(tmp_path / "data", "a", np.zeros((16, 16, 3), np.uint8), [disk((16, 16), (8, 8), 3)])
    cache = tmp_path / "cache"
    first = read_sample_cached(sample_files(folder), True, cache)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))

    def fail(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(dio, "read_sample", fail)
    second = read_sample_cached(sample_files(folder), True, cache)
    assert np.array_equal(first[1], second[1])
    monkeypatch.undo()
    write_png(folder / "masks" / "m001.png", disk((16, 16), (2, 2), 1).astype(np.uint8) * 255)
    third = read_sample_cached(sample_files(folder), True, cache)
    assert third[1].max() == 2 and len(list(cache.glob("*.npz"))) == 2


@pytest.mark.parametrize("dtype, value", [(np.uint8, 1), (np.uint8, 255), (np.uint16, 1000), (np.uint16, 65535)])
def test_a_mask_may_use_any_single_non_zero_value(tmp_path, dtype, value):
    nucleus = disk((20, 30), (8, 8), 4)
    path = write_png(tmp_path / "m.png", nucleus.astype(dtype) * value)
    assert np.array_equal(read_mask(path, (20, 30)), nucleus)
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[nucleus] = (0, 200, 90)
    assert np.array_equal(read_mask(write_png(tmp_path / "c.png", colour), (20, 30)), nucleus)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_label_image_in_masks_is_an_error_naming_it(tmp_path, dtype):
    shape = (20, 30)
    folder = make_sample(tmp_path, "s", np.zeros(shape + (3,), np.uint8), [disk(shape, (4, 4), 2)])
    labels = disk(shape, (8, 8), 4).astype(dtype) + disk(shape, (10, 22), 4).astype(dtype) * 2
    bad = write_png(folder / "masks" / "labels.png", labels)
    with pytest.raises(InputError, match=f"{bad}: mask holds 2 different non-zero values"):
        read_sample(sample_files(folder))
    colours = np.zeros(shape + (3,), np.uint8)
    colours[disk(shape, (8, 8), 4)] = (255, 0, 0)
    colours[disk(shape, (10, 22), 4)] = (0, 255, 0)  # the same maximum, another colour
    write_png(bad, colours)
    with pytest.raises(InputError, match=f"{bad}: mask holds 2 different non-zero values"):
        read_sample(sample_files(folder))


def rings(shape, centre, pairs):
    """One ring mask per (outer, inner) radius pair, all around `centre`."""
    return [disk(shape, centre, outer) & ~disk(shape, centre, inner) for outer, inner in pairs]


@pytest.mark.parametrize("ring_first", [True, False])
def test_filling_a_ring_never_takes_the_nucleus_inside_it(ring_first):
    shape = (21, 21)
    ring, = rings(shape, (10, 10), [(8, 5)])
    inside = disk(shape, (10, 10), 3)
    masks = [ring, inside] if ring_first else [inside, ring]
    ring_id, inside_id = (1, 2) if ring_first else (2, 1)
    labels = compose_labels(masks, shape, fill_holes=True)
    assert np.array_equal(labels == inside_id, inside)
    assert np.array_equal(labels == ring_id, disk(shape, (10, 10), 8) & ~inside)  # the gap joins the ring
    assert np.array_equal(compose_labels(masks, shape, fill_holes=False) == ring_id, ring)


def test_a_hole_inside_two_rings_goes_to_the_inner_one():
    shape = (25, 25)
    outer, inner = rings(shape, (12, 12), [(11, 7), (5, 2)])
    labels = compose_labels([outer, inner], shape, fill_holes=True)
    assert np.array_equal(labels == 2, disk(shape, (12, 12), 5))
    assert np.array_equal(labels == 1, disk(shape, (12, 12), 11) & ~disk(shape, (12, 12), 5))


def test_stray_files_in_masks_are_refused_and_hidden_ones_ignored(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    folder = make_sample(tmp_path, "s", image, [disk((20, 30), (8, 8), 3)])
    (folder / "masks" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert [p.name for p in sample_files(folder).mask_paths] == ["m000.png"]
    stray = folder / "masks" / "m001.npy"
    stray.write_bytes(b"a mask in another format")
    with pytest.raises(InputError, match=f"{stray}: not a mask image"):
        list_samples(tmp_path)
    stray.unlink()
    (folder / "masks" / "more").mkdir()
    with pytest.raises(InputError, match="masks/more: not a mask image"):
        list_samples(tmp_path)


def test_group_file(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    folder = make_sample(tmp_path, "tile_0_0", image, [disk((8, 8), (4, 4), 2)])
    assert sample_files(folder).group is None
    (folder / "group.txt").write_text("movie 3\n")
    assert sample_files(folder).group == "movie 3"
    (folder / "group.txt").write_text("\n")
    with pytest.raises(InputError, match="group.txt: a group file must hold one non-empty line"):
        list_samples(tmp_path)
