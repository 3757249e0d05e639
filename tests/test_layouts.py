"""Dataset layouts (dataset/layouts.py): detection, each layout's samples read back exactly from tiny
files written by tests/layout_files.py, percentile normalisation, the split by sequence, the
data-split CSV, and one training run on a non-DSB layout."""
import dataclasses
import os
import textwrap

import numpy as np
import pandas as pd
import pytest

import split
from config import InputError
from dataset.io import list_samples, read_image, read_sample, read_sample_cached
from dataset.layouts import (detect_layout, layout_samples, matching_layouts, prediction_percentiles,
                              read_split_csv, settle_normalize, write_split_csv)
from dataset.selection import named_samples, training_split
from tests import layout_files as lf


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label maps hold the same instances, whatever their numbers."""
    if (a > 0).tolist() != (b > 0).tolist():
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist()))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def test_each_layout_is_detected(tmp_path):
    lf.write_dsb(tmp_path / "dsb")
    lf.write_im_mask(tmp_path / "dice")
    lf.write_timelapse(tmp_path / "aihero")
    lf.write_label_images(tmp_path / "neurips")
    lf.write_label_images(tmp_path / "neurips_split", split=True)
    lf.write_label_images(tmp_path / "unlabelled", labels_written=False)
    expected = {"dsb": "dsb2018", "dice": "im_mask", "aihero": "timelapse", "neurips": "label_images",
                "neurips_split": "label_images", "unlabelled": "label_images"}
    assert {name: detect_layout(tmp_path / name) for name in expected} == expected


def test_a_folder_of_several_layouts_or_none_is_one_clear_error(tmp_path):
    mixed = tmp_path / "mixed"
    lf.write_dsb(mixed, n=1)
    lf.write_im_mask(mixed, n=1)
    assert matching_layouts(mixed) == ["dsb2018", "im_mask"]
    with pytest.raises(InputError, match=r"mixed: matches several dataset layouts \(dsb2018, im_mask\); "
                                         r"set \[dataset\] layout"):
        detect_layout(mixed)
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="notes: matches none of the dataset layouts"):
        detect_layout(empty)
    with pytest.raises(InputError, match="nowhere: dataset folder not found"):
        detect_layout(tmp_path / "nowhere")


def test_the_layout_setting_overrides_detection(tmp_path, cfg):
    mixed = tmp_path / "mixed"
    lf.write_dsb(mixed, n=2)
    lf.write_im_mask(mixed, n=3)
    assert [s.id for s in layout_samples(mixed, dataclasses.replace(cfg.dataset, layout="im_mask"))] == ["1", "2", "3"]
    with pytest.raises(InputError, match=r"mixed/im: no images/ folder in this sample"):
        layout_samples(mixed, dataclasses.replace(cfg.dataset, layout="dsb2018"))  # im/ is no DSB sample


def test_dsb2018_samples_are_read_as_before(tmp_path, cfg):
    truth = lf.write_dsb(tmp_path / "dsb", n=2)
    samples = layout_samples(tmp_path / "dsb", cfg.dataset)
    assert samples == list_samples(tmp_path / "dsb")  # same objects: no percentile normalisation by default
    for files in samples:
        image, labels = read_sample(files)
        assert same_partition(labels, truth[files.id])
        assert (image == read_image(files.image_path)).all()
    stretched = layout_samples(tmp_path / "dsb", dataclasses.replace(cfg.dataset, normalize="percentile"))
    assert stretched[0].percentiles == (1.0, 99.8)


def test_auto_normalisation_is_settled_for_the_checkpoint(tmp_path, cfg):
    lf.write_dsb(tmp_path / "dsb", n=1)
    lf.write_im_mask(tmp_path / "dice", n=1)
    dsb, dice = (layout_samples(tmp_path / name, cfg.dataset) for name in ("dsb", "dice"))
    assert settle_normalize(cfg, dsb).dataset.normalize == "range"
    settled = settle_normalize(cfg, dice)
    assert settled.dataset.normalize == "percentile" and prediction_percentiles(settled.dataset) == (1.0, 99.8)
    assert prediction_percentiles(cfg.dataset) is None  # auto: a checkpoint trained on DSB2018 as stored
    explicit = cfg.replace("dataset", normalize="range")
    assert settle_normalize(explicit, dice) is explicit and prediction_percentiles(explicit.dataset) is None


def test_percentile_normalisation_of_16_bit_grey_and_two_channel_images(tmp_path):
    ramp = np.arange(1000, dtype=np.uint16).reshape(20, 50) + 3000
    path = lf.write_tiff(tmp_path / "ramp.tif", ramp)
    image = read_image(path, (1.0, 99.8))
    assert image.shape == (20, 50, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    low, high = np.percentile(ramp.astype(np.float32), (1.0, 99.8))
    expected = np.round(np.clip((ramp - low) * (255 / (high - low)), 0, 255)).astype(np.uint8)
    assert (image[..., 0] == expected).all()
    # 1st percentile 3009.99, 99.8th 3997.0: 3000..3011 round to 0, 3996..3999 to 255
    assert (image[..., 0] == 0).sum() == 12 and (image[..., 0] == 255).sum() == 4
    two = np.stack([ramp, ramp // 2])  # channel-first, as many TIFF writers store channels
    rgb = read_image(lf.write_tiff(tmp_path / "two.tif", two), (0.0, 100.0))
    assert rgb.shape == (20, 50, 3) and rgb[..., 2].max() == 0 and rgb[..., 0].max() == 255
    assert rgb[..., 1].max() < 255  # one stretch for all channels: the dimmer channel stays dimmer
    grey8 = np.tile(np.arange(50, 150, dtype=np.uint8), (4, 1))
    out = read_image(lf.write_png(tmp_path / "grey.png", grey8), (0.0, 100.0))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [255, 255, 255]


def test_colour_png_keeps_its_channel_order_under_percentiles(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's order
    bgr[0, 0, 2] = 10
    image = read_image(lf.write_png(tmp_path / "red.png", bgr), (0.0, 100.0))
    assert image[1, 1].tolist() == [255, 0, 0]


def test_label_images_are_read_exactly(tmp_path, cfg):
    truth = lf.write_label_images(tmp_path / "cells", n=5)
    samples = layout_samples(tmp_path / "cells", cfg.dataset)
    assert [s.id for s in samples] == sorted(truth)
    suffixes = set()
    for files in samples:
        image, labels = read_sample(files)
        suffixes.add(files.image_path.suffix)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and labels.dtype == np.int32
        assert (labels == truth[files.id]).all()
        # the nuclei are brighter than the background after normalisation, whatever the file type
        assert image[labels > 0].mean() > image[labels == 0].mean() + 100
    assert suffixes == {".tif", ".png", ".bmp", ".tiff", ".jpg"}


def test_label_image_values_are_kept_and_bad_label_images_refused(tmp_path):
    base = tmp_path / "cells"
    lf.write_png(base / "x.png", np.zeros((6, 6), np.uint8))
    labels = np.zeros((6, 6), np.uint32)
    labels[1:3, 1:3] = 70000  # above 16 bit
    labels[4:6, 4:6] = 5
    lf.write_tiff(base / "x_label.tif", labels)
    from config import load_config
    data = load_config(user_path=None).dataset
    files = layout_samples(base, data)[0]
    assert (read_sample(files)[1] == labels.astype(np.int32)).all()
    lf.write_tiff(base / "x_label.tif", np.full((6, 6), -1, np.int16))
    with pytest.raises(InputError, match="x_label.tif: label values must be whole numbers"):
        read_sample(files)
    lf.write_tiff(base / "x_label.tif", np.zeros((5, 6), np.uint16))
    with pytest.raises(InputError, match="x_label.tif: label image size 6x5 differs from its image size 6x6"):
        read_sample(files)
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    (base / "x_label.tif").unlink()
    lf.write_png(base / "x_label.png", colour)
    with pytest.raises(InputError, match="x_label.png: label image has colour channels that differ"):
        read_sample(layout_samples(base, data)[0])


def test_label_images_without_their_partner_are_named(tmp_path, cfg):
    lf.write_label_images(tmp_path / "cells", n=3)
    (tmp_path / "cells" / "cell_00002_label.png").unlink()
    with pytest.raises(InputError, match=r"cell_00002.png: image without a label image cell_00002_label"):
        layout_samples(tmp_path / "cells", cfg.dataset)
    lf.write_label_images(tmp_path / "more", n=2)
    (tmp_path / "more" / "cell_00001.tif").unlink()
    with pytest.raises(InputError, match=r"cell_00001_label.tiff: label image without an image cell_00001"):
        layout_samples(tmp_path / "more", cfg.dataset)


def test_unlabelled_folders_are_test_images(tmp_path, cfg):
    lf.write_label_images(tmp_path / "test", n=3, labels_written=False)
    lf.write_im_mask(tmp_path / "dice_test", n=2, masks=False)
    lf.write_timelapse(tmp_path / "seq_test", sequences=("d",), n_frames=2, ground_truth=False)
    for name, count in (("test", 3), ("dice_test", 2), ("seq_test", 2)):
        samples = layout_samples(tmp_path / name, cfg.dataset)
        assert len(samples) == count and all(s.mask_paths is None for s in samples)
        image, labels = read_sample(samples[0])
        assert labels is None and image.shape == (48, 48, 3)


def test_im_mask_instances_are_connected_components_and_touching_nuclei_merge(tmp_path, cfg):
    truth = lf.write_im_mask(tmp_path / "dice", n=3)
    for files in layout_samples(tmp_path / "dice", cfg.dataset):
        assert files.labels_kind == "binary"
        assert same_partition(read_sample(files)[1], truth[files.id])
    root = tmp_path / "touching"
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 3:12] = 1       # two nuclei that share a border: one instance
    mask[5:15, 12:20] = 1
    mask[2:5, 24:28] = 1       # a third, apart
    mask[16:19, 24:28] = 1
    mask[17, 25] = 0           # a hole: filled with fill_holes
    lf.write_png(root / "im" / "a.png", np.zeros((20, 30, 3), np.uint8))
    lf.write_png(root / "mask" / "a.png", mask)  # 0/1, not 0/255
    files = layout_samples(root, cfg.dataset)[0]
    labels = read_sample(files, fill_holes=True)[1]
    assert labels.max() == 3 and len(np.unique(labels[5:15, 3:20])) == 1 and labels[17, 25] == labels[16, 24]
    assert read_sample(files, fill_holes=False)[1][17, 25] == 0


def test_im_mask_pairs_are_checked(tmp_path, cfg):
    lf.write_im_mask(tmp_path / "dice", n=3)
    (tmp_path / "dice" / "mask" / "2.png").unlink()
    with pytest.raises(InputError, match=r"im/2.png: image without a mask of that name"):
        layout_samples(tmp_path / "dice", cfg.dataset)


def test_timelapse_frames_without_labels_are_skipped_and_ids_kept(tmp_path, cfg):
    truth = lf.write_timelapse(tmp_path / "seq", n_frames=4, unlabelled=(1, 2))
    samples = layout_samples(tmp_path / "seq", cfg.dataset)
    assert [s.id for s in samples] == ["a_t0000", "a_t0003", "b_t0000", "b_t0003", "c_t0000", "c_t0003"]
    assert [s.group for s in samples] == ["a", "a", "b", "b", "c", "c"]
    for files in samples:
        image, labels = read_sample(files)
        assert (labels == truth[files.id]).all() and labels.max() > 1000
    flat = lf.write_timelapse(tmp_path / "flat", sequences=("01",), n_frames=2, seg_folder=False)
    assert [s.id for s in layout_samples(tmp_path / "flat", cfg.dataset)] == sorted(flat)
    lf.write_tiff(tmp_path / "seq" / "a_GT" / "SEG" / "man_seg0009.tif", np.zeros((48, 48), np.uint16))
    with pytest.raises(InputError, match=r"man_seg0009.tif: label image without a frame t0009"):
        layout_samples(tmp_path / "seq", cfg.dataset)


def test_the_validation_split_is_by_sequence(tmp_path, cfg):
    lf.write_timelapse(tmp_path / "data" / "train", sequences=("a", "b", "c", "d"), n_frames=3, size=32)
    for seed in range(5):
        run = cfg.replace("dataset", root=str(tmp_path / "data"), cv_ratio=0.3, split_seed=seed)
        train, valid = training_split(run)
        assert len(train) + len(valid) == 12 and len(valid) in (3, 6)
        assert not {s.group for s in train} & {s.group for s in valid}


def test_split_py_keeps_sequences_whole_in_folders(tmp_path, cfg):
    lf.write_timelapse(tmp_path / "raw", sequences=("a", "b", "c"), n_frames=2, size=32, unlabelled=(1,))
    assert split.split_dataset(tmp_path / "raw", tmp_path / "out", 0.3, 0, None, cfg.dataset) == (2, 1)
    parts = {part: layout_samples(tmp_path / "out" / part, cfg.dataset) for part in ("train", "valid")}
    assert detect_layout(tmp_path / "out" / "valid") == "timelapse"
    groups = {part: {s.group for s in samples} for part, samples in parts.items()}
    assert len(groups["valid"]) == 1 and not groups["train"] & groups["valid"]
    linked = parts["valid"][0].mask_paths[0]
    assert os.stat(linked).st_nlink == 2  # hard-linked from raw/


def test_split_csv_round_trip(tmp_path, cfg, monkeypatch, capsys):
    lf.write_timelapse(tmp_path / "data" / "seqs", sequences=("a", "b", "c"), n_frames=2, size=32)
    monkeypatch.chdir(tmp_path)
    split.main(["data/seqs", "--split-csv", "data/split.csv", "--ratio", "0.3", "--seed", "2"])
    assert "-> data/split.csv" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "data" / "split.csv")
    assert list(table.columns) == ["usage", "layout", "path"] and len(table) == 6
    assert set(table.usage) == {"train", "valid"} and set(table.layout) == {"timelapse"}
    assert table.path[0].startswith("seqs/")  # relative to the CSV's folder
    parts = read_split_csv(tmp_path / "data" / "split.csv", cfg.dataset)
    _, by_id, train_ids, valid_ids = split.choose_split(tmp_path / "data" / "seqs", 0.3, 2, None, cfg.dataset)
    assert [s.id for s in parts["train"]] == train_ids and [s.id for s in parts["valid"]] == valid_ids
    assert [s.group for s in parts["valid"]] == [by_id[i].group for i in valid_ids]
    assert parts["train"][0] == by_id[train_ids[0]]
    # training and valid.py read the same split from the CSV, whatever [dataset] root says
    run = cfg.replace("dataset", root=str(tmp_path / "elsewhere"), split_csv=str(tmp_path / "data" / "split.csv"))
    assert training_split(run) == (parts["train"], parts["valid"])
    assert named_samples(run, "valid") == parts["valid"]
    with pytest.raises(InputError, match="split.csv: split CSV has no test rows"):
        named_samples(run, "test")
    with pytest.raises(InputError, match="already exists; add --force"):
        split.main(["data/seqs", "--split-csv", "data/split.csv"])
    # a hand-written CSV of another layout, without a layout column, with validate rows
    lf.write_label_images(tmp_path / "data" / "crops", n=3)
    (tmp_path / "hand.csv").write_text("usage,path\ntrain,data/crops/cell_00001.tif\n"
                                       "train,data/crops/cell_00002.png\nvalidate,data/crops/cell_00003.bmp\n")
    labelled = cfg.replace("dataset", layout="label_images", split_csv=str(tmp_path / "hand.csv"))
    train, valid = training_split(labelled)
    assert [s.id for s in train] == ["cell_00001", "cell_00002"] and [s.id for s in valid] == ["cell_00003"]
    assert valid[0].labels_kind == "labels" and valid[0].percentiles == (1.0, 99.8)
    write_split_csv(tmp_path / "again.csv", {"train": train, "valid": valid}, "label_images")
    assert read_split_csv(tmp_path / "again.csv", cfg.dataset) == {"train": train, "valid": valid, "test": []}


@pytest.mark.parametrize("text, message", [
    ("usage,layout,path\ntrain,im_mask,nothere/x.png\n", r"bad.csv row 2: .*nothere/x.png not found"),
    ("usage,path\ntraining,crops/cell_00001.tif\n", r"bad.csv row 2: usage 'training' is not one of train, valid"),
    ("use,path\ntrain,crops/cell_00001.tif\n", r"bad.csv: split CSV has no usage column"),
    ("usage,layout,path\ntrain,neurips,crops/cell_00001.tif\n", r"bad.csv row 2: layout 'neurips' is not one of"),
    ("usage,layout,path\ntrain,label_images,crops/cell_00001.tif\nvalid,label_images,crops/cell_00001.tif\n",
     r"bad.csv row 3: sample cell_00001 is also on row 2"),
    ("usage,layout,path\ntrain,label_images,crops/cell_00001_label.tiff\n",
     r"bad.csv row 2: .*cell_00001_label.tiff is not a sample of layout label_images"),
    ("usage,path\ntrain,crops/cell_00001.tif\n", r"bad.csv row 2: no layout column value, and \[dataset\] layout is auto"),
])
def test_bad_split_csv_is_one_line_naming_file_and_row(tmp_path, cfg, text, message):
    lf.write_label_images(tmp_path / "crops", n=2)
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_split_csv(tmp_path / "bad.csv", cfg.dataset)


def test_csv_whitelist_filters_split_csv_rows(tmp_path, cfg):
    lf.write_label_images(tmp_path / "crops", n=4)
    rows = [f"{u},label_images,crops/cell_{i:05d}{s}" for i, u, s in
            ((1, "train", ".tif"), (2, "train", ".png"), (3, "train", ".bmp"), (4, "valid", ".tiff"))]
    (tmp_path / "split.csv").write_text("usage,layout,path\n" + "\n".join(rows) + "\n")
    (tmp_path / "white.csv").write_text("image_id\ncell_00001\ncell_00003\ncell_00004\n")
    run = cfg.replace("dataset", split_csv=str(tmp_path / "split.csv"), csv_file=str(tmp_path / "white.csv"))
    train, valid = training_split(run)
    assert [s.id for s in train] == ["cell_00001", "cell_00003"] and [s.id for s in valid] == ["cell_00004"]


def test_the_cache_keys_the_normalisation(tmp_path, cfg):
    lf.write_label_images(tmp_path / "cells", n=1)
    files = layout_samples(tmp_path / "cells", cfg.dataset)[0]
    cache = tmp_path / "cache"
    first = read_sample_cached(files, True, cache)[0]
    wide = dataclasses.replace(files, percentiles=(0.0, 100.0))
    second = read_sample_cached(wide, True, cache)[0]
    assert len(os.listdir(cache)) == 2 and not (first == second).all()
    assert (read_sample_cached(files, True, cache)[0] == first).all()


def test_train_one_epoch_on_a_timelapse_layout_and_validate_by_sequence(tmp_path, monkeypatch, capsys):
    import train
    import valid
    lf.write_timelapse(tmp_path / "data" / "train", sequences=("a", "b", "c"), n_frames=2, size=48,
                       unlabelled=(1,))
    (tmp_path / "tiny.ini").write_text(textwrap.dedent("""
        [model]
        model = caunet
        encoder = plain
        n_filter = 4
        [train]
        amp = off
        n_batch = 2
        n_worker = 0
        n_cv_epoch = 1
        n_ckpt_epoch = 1
        checkpoint_dir = ckpt
        log_dir = runs
        [pre]
        width = 32
        [dataset]
        root = data
        cv_ratio = 0.3
        cache_dir = cache
        """))
    monkeypatch.chdir(tmp_path)
    train.main(["--config", "tiny.ini", "--quiet", "--no-resume", "--epoch", "1"])
    printed = capsys.readouterr().out
    assert "2 training and 1 validation images" in printed
    assert (tmp_path / "ckpt" / "ckpt-1.pkl").is_file()
    from model.checkpoint import read_checkpoint
    # the checkpoint says how its images were read, so predict.py reads new images the same way
    assert read_checkpoint(tmp_path / "ckpt" / "ckpt-1.pkl")["config"]["dataset"]["normalize"] == "percentile"
    valid.main(["ckpt/ckpt-1.pkl", "--config", "tiny.ini", "--dataset", "valid", "--scores", "scores.csv"])
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 1


def test_the_layout_code_imports_without_torch(tmp_path):
    import subprocess
    import sys
    from tests.conftest import REPO
    code = ("import sys, dataset.layouts, tests.layout_files, split; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr


def docs_blocks() -> list[tuple[str, str]]:
    """(section title, shell text) of the sh blocks in docs/datasets.md's walk-through section."""
    import re
    from tests.conftest import REPO
    text = (REPO / "docs" / "datasets.md").read_text()
    text = text[text.index("## From each challenge's raw layout"):]
    blocks, title = [], "setup"
    for part in re.split(r"^(### .*)$", text, flags=re.M):
        if part.startswith("### "):
            title = part[4:]
            continue
        blocks += [(title, block) for block in re.findall(r"```sh\n(.*?)```", part, flags=re.S)]
    return blocks


@pytest.mark.slow
def test_the_commands_of_docs_datasets_md_run(tmp_path):
    """Every command block of docs/datasets.md's walk-through, in order, in a scratch folder (python3
    is this interpreter, the scripts are the repository's); each validation writes its scores."""
    import re
    import subprocess
    import sys
    from tests.conftest import REPO
    blocks = docs_blocks()
    # the setup block, then each challenge's training and validation block (and any submission blocks)
    assert blocks[0][0] == "setup" and len(blocks) >= 5
    for title, block in blocks:
        script = re.sub(r"python3 (\w+\.py)", rf"{sys.executable} {REPO}/\1", block)
        script = script.replace("python3 -m", f"{sys.executable} -m")
        result = subprocess.run(["bash", "-euc", script], cwd=tmp_path, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, f"{title}: {result.stderr[-2000:]}"
    for name in ("dice", "neurips", "aihero", "cellmap"):
        scores = pd.read_csv(tmp_path / "out" / name / "valid_scores.csv")
        assert len(scores) == 2, name
    # each challenge's submission (docs/predict.md)
    out = tmp_path / "out"
    assert (out / "dice" / "submission.csv").read_text().splitlines()[0] == "img,pixels"
    assert sorted(p.name for p in (out / "neurips" / "submission").iterdir()) == [
        f"cell_0000{i}_label.tiff" for i in (1, 2, 3)]
    assert sorted(p.name for p in (out / "aihero" / "submission" / "d").iterdir()) == ["mask0000.tif", "mask0001.tif"]
    assert len(list((out / "cellmap" / "labels").iterdir())) == 2
