"""crop.py: tile positions, pixels, mask splitting, empty tiles, padding, CSV rows and bad input."""
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

import crop
from config import InputError
from dataset.io import list_samples, read_sample
from dataset.selection import sample_groups
from dataset.tiles import tile_origins
from tests.conftest import REPO, SAMPLE, disk, make_sample, write_png

SHAPE = (300, 520)
# disk centre, radius -> the tiles (y, x) of a width 256 / step 200 crop that it reaches
DISKS = {"m000": ((20, 100), 8, {(0, 0)}),
         "m001": ((280, 230), 10, {(44, 0), (44, 200)}),
         "m002": ((150, 490), 12, {(0, 264), (44, 264)})}


@pytest.fixture
def synthetic(tmp_path):
    """tmp_path/src/img: a random BGR uint8 300x520 image with the three DISKS as masks."""
    image = np.random.default_rng(0).integers(0, 256, SHAPE + (3,), dtype=np.uint8)
    make_sample(tmp_path / "src", "img", image, [disk(SHAPE, c, r) for c, r, _ in DISKS.values()])
    return tmp_path / "src", image


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def names(folder):
    return sorted(p.stem for p in folder.iterdir())


def test_tile_origins():
    assert tile_origins(520, 256, 200) == [0, 200, 264]
    assert tile_origins(300, 256, 200) == [0, 44]
    assert tile_origins(456, 256, 200) == [0, 200]      # the edge tile is not repeated
    assert tile_origins(656, 256, 200) == [0, 200, 400]
    assert tile_origins(257, 256, 200) == [0, 1]
    assert tile_origins(256, 256, 200) == [0]
    assert tile_origins(100, 256, 200) == [0]
    assert tile_origins(10, 4, 4) == [0, 4, 6]
    assert tile_origins(20, 8, 10) == [0, 10, 12]       # a step above the width leaves gaps
    with pytest.raises(ValueError, match="at least 1"):
        tile_origins(20, 8, 0)


def test_tiles_hold_the_source_pixels_and_their_masks(synthetic, tmp_path):
    source, image = synthetic
    out = tmp_path / "out"
    assert crop.crop_dataset(source, out, 256, 200) == (5, 1)
    expected = {(y, x): sorted(m for m, (_, _, tiles) in DISKS.items() if (y, x) in tiles)
                for y in (0, 44) for x in (0, 200, 264)}
    assert names(out) == sorted(f"img_{y}_{x}" for (y, x), masks in expected.items() if masks)
    for (y, x), masks in expected.items():
        folder = out / f"img_{y}_{x}"
        if not masks:
            continue
        tile = read(folder / "images" / f"img_{y}_{x}.png")
        assert tile.dtype == np.uint8 and np.array_equal(tile, image[y:y + 256, x:x + 256])
        assert names(folder / "masks") == masks
        for name in masks:
            (cy, cx), radius, _ = DISKS[name]
            whole = disk(SHAPE, (cy, cx), radius).astype(np.uint8) * 255
            assert np.array_equal(read(folder / "masks" / f"{name}.png"), whole[y:y + 256, x:x + 256])
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary folder left


def test_keep_empty_keeps_tiles_without_nuclei_as_training_samples(synthetic, tmp_path):
    source, _ = synthetic
    out = tmp_path / "out"
    assert crop.crop_dataset(source, out, 256, 200, keep_empty=True) == (6, 0)
    empty = {s.id: s for s in list_samples(out)}["img_0_200"]
    assert empty.mask_paths == ()  # an empty masks/ folder, not a test image


def test_small_images_are_padded_with_their_median_and_masks_with_zero(tmp_path):
    image = np.full((100, 300), 1000, np.uint16)
    nucleus = disk((100, 300), (50, 280), 10)
    image[nucleus] = 40000
    make_sample(tmp_path / "src", "deep", image, [nucleus])
    out = tmp_path / "out"
    assert crop.crop_dataset(tmp_path / "src", out, 256, 200, keep_empty=True) == (2, 0)
    assert names(out) == ["deep_0_0", "deep_0_44"]
    tile = read(out / "deep_0_44" / "images" / "deep_0_44.png")
    assert tile.shape == (256, 256) and tile.dtype == np.uint16
    assert np.array_equal(tile[:100], image[:, 44:]) and (tile[100:] == 1000).all()
    mask = read(out / "deep_0_44" / "masks" / "m000.png")
    assert mask.shape == (256, 256) and not mask[100:].any()
    assert np.array_equal(mask[:100] > 0, nucleus[:, 44:])
    assert names(out / "deep_0_0" / "masks") == []


def test_test_images_keep_every_tile_and_have_no_masks_folder(tmp_path):
    rgba = np.zeros((300, 300, 4), np.uint8)
    make_sample(tmp_path / "src", "t", rgba, None)
    assert crop.crop_dataset(tmp_path / "src", tmp_path / "out", 256, 200) == (4, 0)
    for sample in list_samples(tmp_path / "out"):
        assert sample.mask_paths is None
        assert read(sample.image_path).shape == (256, 256, 4)


def test_csv_gets_one_row_per_tile(synthetic, tmp_path, monkeypatch, capsys):
    source, _ = synthetic
    make_sample(source, "loose", np.zeros((256, 256, 3), np.uint8), [disk((256, 256), (9, 9), 5)])
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id,source,major_category\nimg,lab1,Histo\nother,lab2,Fluo\n")
    monkeypatch.chdir(tmp_path)  # no ./config.ini from the working copy
    args = [str(source), "--step", "200", "--width", "256", "--csv", str(csv)]
    crop.main(args)
    table = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("image_id")
    assert list(table.columns) == ["source", "major_category", "parent_id", "y", "x", "width"]
    assert table.loc["img_44_264"].tolist() == ["lab1", "Histo", "img", "44", "264", "256"]
    assert table.loc["loose_0_0"].tolist() == ["", "", "loose", "0", "0", "256"]
    assert table.loc["other"].tolist() == ["lab2", "Fluo", "", "", "", ""]
    assert len(table) == 2 + 5 + 1
    assert "6 tiles written, 1 dropped" in capsys.readouterr().out
    crop.main(args + ["--force"])  # a second run replaces its rows rather than adding them again
    assert len(pd.read_csv(csv)) == 8


def test_refuses_existing_output_and_replaces_it_with_force(synthetic, tmp_path):
    source, _ = synthetic
    out = tmp_path / "src_crop"
    (out / "old").mkdir(parents=True)
    with pytest.raises(InputError, match="already exists"):
        crop.crop_dataset(source, out, 256, 200)
    assert names(out) == ["old"]
    crop.crop_dataset(source, out, 256, 200, force=True)
    assert "old" not in names(out) and len(names(out)) == 5
    with pytest.raises(InputError, match="lies inside the source"):
        crop.crop_dataset(source, source / "crops", 256, 200)
    with pytest.raises(InputError, match="holds the source"):
        crop.crop_dataset(source, tmp_path, 256, 200, force=True)
    assert sorted(os.listdir(tmp_path)) == ["src", "src_crop"]


def test_mask_size_mismatch_exits_2_and_leaves_nothing(synthetic, tmp_path):
    source, _ = synthetic
    bad = write_png(source / "img" / "masks" / "m003.png", np.full((10, 10), 255, np.uint8))
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id\nimg\n")
    result = subprocess.run([sys.executable, "crop.py", str(source), "--step", "200", "--width", "256",
                             "--csv", str(csv)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: mask size 10x10")
    assert sorted(os.listdir(tmp_path)) == ["meta.csv", "src"]  # no src_crop, no temporary file
    assert csv.read_text() == "image_id\nimg\n"


def test_real_sample_crops_into_readable_samples(tmp_path):
    sample_id = "0d3640c1f1b80f24e94cc9a5f3e1d9e8db7bf6af7d4aba920265f46cadc25e37"  # 256x320 RGBA
    shutil.copytree(SAMPLE / sample_id, tmp_path / "src" / sample_id)
    written, dropped = crop.crop_dataset(tmp_path / "src", tmp_path / "out", 200, 150)
    assert (written, dropped) == (4, 0)
    source_image = read(SAMPLE / sample_id / "images" / f"{sample_id}.png")
    for sample in list_samples(tmp_path / "out"):
        y, x = map(int, sample.id.rsplit("_", 2)[1:])
        assert np.array_equal(read(sample.image_path), source_image[y:y + 200, x:x + 200])
        image, labels = read_sample(sample)  # every written mask is non-empty and the right size
        assert image.shape == (200, 200, 3) and labels.max() > 0


def test_every_tile_records_the_group_of_its_source_image(synthetic, tmp_path):
    source, _ = synthetic
    crop.crop_dataset(source, tmp_path / "once", 256, 200)
    assert {(f / "group.txt").read_text() for f in (tmp_path / "once").iterdir()} == {"img\n"}
    # tiles of tiles keep the original image as their group, not the tile they were cut from
    crop.crop_dataset(tmp_path / "once", tmp_path / "twice", 128, 128)
    twice = list_samples(tmp_path / "twice")
    assert len({s.id.rsplit("_", 2)[0] for s in twice}) == 5  # one from each first-level tile
    assert set(sample_groups(twice).values()) == {"img"}


def test_the_csv_parent_chain_names_the_group_when_the_source_has_no_group_file(synthetic, tmp_path):
    source, _ = synthetic
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id,parent_id\nimg,movie7\n")  # img is one frame of a time-lapse
    crop.crop_dataset(source, tmp_path / "out", 256, 200, csv_path=csv)
    assert {(f / "group.txt").read_text() for f in (tmp_path / "out").iterdir()} == {"movie7\n"}


def test_a_label_image_in_masks_is_refused(synthetic, tmp_path):
    source, _ = synthetic
    two = (disk(SHAPE, (30, 30), 5) * 1 + disk(SHAPE, (60, 60), 5) * 2).astype(np.uint8)
    bad = write_png(source / "img" / "masks" / "m003.png", two)
    with pytest.raises(InputError, match=f"{bad}: mask holds 2 different non-zero values"):
        crop.crop_dataset(source, tmp_path / "out", 256, 200)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_outputs_are_readable_under_the_users_umask(synthetic, tmp_path):
    source, _ = synthetic
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id\nimg\n")
    old = os.umask(0o022)
    try:
        crop.crop_dataset(source, tmp_path / "out", 256, 200, csv_path=csv, csv_out=tmp_path / "new.csv")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "new.csv").st_mode & 0o777 == 0o644
