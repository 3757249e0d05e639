"""predict.py end to end on a mixed folder: PNG, 16-bit TIFF, grey, RGB and one corrupt file."""
import re

import cv2
import numpy as np
import pytest
import tifffile
import torch

import predict
from config import load_config, run_main
from dataset.io import read_image
from inference import predict_image
from model import build_model
from model.checkpoint import save_checkpoint
from postprocess import postprocess
from rle import read_dice_submission, rle_decode
from tests.conftest import disk, write_png
from tuning import resolve_post
from valid import load_members


def nuclei_image(shape, centres, high=200, dtype=np.uint8):
    image = np.full(shape, 20, np.float64)
    for centre in centres:
        image[disk(shape, centre, 6)] = high
    return image.astype(dtype)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder of mixed images and a fresh (untrained) tiny CAUNet checkpoint."""
    work = tmp_path_factory.mktemp("predict")
    cfg = load_config(user_path=None)
    cfg = cfg.replace("model", model="caunet", encoder="plain", n_filter=4)
    torch.manual_seed(0)
    ckpt = save_checkpoint(work / "ckpt" / "tiny.pkl", build_model(cfg.model), cfg)
    images = work / "images"
    grey = nuclei_image((48, 40), [(15, 15), (30, 28)])
    write_png(images / "a.png", np.dstack([grey, grey // 2, grey]))                   # RGB PNG
    tifffile.imwrite(images / "b16.tif", nuclei_image((40, 56), [(20, 20)], 40000, np.uint16))  # 16-bit
    cv2.imwrite(str(images / "grey.jpg"), nuclei_image((36, 36), [(18, 18)]))          # grey JPEG
    (images / "sub").mkdir()
    tifffile.imwrite(images / "sub" / "c_rgb.tif", np.dstack([grey] * 3))              # RGB TIFF
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")               # corrupt
    tifffile.imwrite(images / "a_label.tiff", np.zeros((48, 40), np.uint16))           # skipped
    write_png(images / ".hidden.png", grey)                                            # skipped
    (work / "settings.ini").write_text("[valid]\ntest_time_augment = False\n")
    return work, ckpt, images


def run(*argv):
    """predict.main through run_main: (exit status, return value)."""
    try:
        return 0, run_main(predict.main, list(argv))
    except SystemExit as exc:
        return exc.code, None


def test_mixed_folder_end_to_end(setup, capsys, monkeypatch):
    work, ckpt, images = setup
    monkeypatch.chdir(work)
    status, _ = run("-i", str(images), "-o", "out", str(ckpt), "--recursive", "--config", "settings.ini",
                    "--dice-csv", "dice.csv")
    captured = capsys.readouterr()
    assert status == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "broken.png: not a readable image" in errors[0]
    assert "1 of 5 input files could not be read" in errors[1]
    assert "4 image(s) -> out in" in captured.out and "peak RSS" in captured.out
    written = sorted(p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file())
    assert written == ["a_label.tiff", "b16_label.tiff", "grey_label.tiff", "sub/c_rgb_label.tiff"]
    shapes = {"a": (48, 40), "b16": (40, 56), "grey": (36, 36), "sub/c_rgb": (48, 40)}
    rows = read_dice_submission(work / "dice.csv")
    assert set(rows) == set(shapes)
    for name, shape in shapes.items():
        labels = tifffile.imread(work / "out" / f"{name}_label.tiff")
        assert labels.dtype == np.uint16 and labels.shape == shape
        ids = np.unique(labels[labels > 0])
        assert list(ids) == list(range(1, len(ids) + 1))  # 1..N, nothing skipped
        assert np.array_equal(rle_decode(rows[name], shape), labels > 0)


def test_labels_equal_the_valid_inference_path(setup, monkeypatch):
    """The same loading, inference and post-processing as valid.py: equal labels."""
    work, ckpt, images = setup
    monkeypatch.chdir(work)
    assert run("-i", str(images / "a.png"), "-o", "one.png", str(ckpt), "--config", "settings.ini")[0] == 0
    written = cv2.imread(str(work / "one.png"), cv2.IMREAD_UNCHANGED)
    cfg = load_config("settings.ini", user_path=None)
    members, cfg = load_members([ckpt], cfg, torch.device("cpu"), False)
    post, _ = resolve_post(cfg, ckpt, True)
    expected = postprocess(predict_image(members, read_image(images / "a.png"), cfg.valid), post)
    assert written.dtype == np.uint16 and np.array_equal(written > 0, expected > 0)
    assert written.max() == expected.max()


def test_memory_cap_predicts_in_tiles(setup, capsys, monkeypatch):
    work, ckpt, images = setup
    monkeypatch.chdir(work)
    big = nuclei_image((120, 100), [(30, 30), (80, 70)])
    write_png(work / "big" / "big.png", big)
    (work / "cap.ini").write_text("[valid]\ntest_time_augment = False\nmax_memory_mb = 2\n")
    status, _ = run("-i", "big", "-o", "capped", str(ckpt), "--config", "cap.ini")
    out = capsys.readouterr().out
    assert status == 0, out
    side = int(re.search(r"memory cap 2 MB: tile sides (\d+) to", out).group(1))
    assert side < 120 and side % 16 == 0   # the image is cut into tiles that fit the cap
    labels = tifffile.imread(work / "capped" / "big_label.tiff")
    assert labels.shape == (120, 100)


@pytest.mark.parametrize("argv, message", [
    (["-i", "images", "-o", "images/out"], "the output lies inside the input folder"),
    (["-i", "images/a.png", "-o", "images/a.png"], "would write over an input image"),
    (["-i", "images", "-o", "out2", "--dice-csv", "ckpt/tiny.pkl"], "--dice-csv would write over"),
    (["-i", "images/sub/c_rgb.tif", "-o", "ckpt/tiny.pkl"], "the output is a file"),
    (["-i", "nowhere", "-o", "out3"], "nowhere: input not found"),
    (["-i", "ckpt", "-o", "out4"], "ckpt: no image files"),
])
def test_bad_outputs_are_refused_before_predicting(setup, capsys, monkeypatch, argv, message):
    work, ckpt, _ = setup
    monkeypatch.chdir(work)
    status, _ = run(*argv, str(ckpt))
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1
    assert not (work / "out2").exists() and not (work / "out3").exists() and not (work / "images" / "out").exists()


def test_frames_get_mask_names(setup, monkeypatch):
    work, ckpt, _ = setup
    monkeypatch.chdir(work)
    frame = nuclei_image((32, 32), [(16, 16)], 3000, np.uint16)
    (work / "seq" / "a").mkdir(parents=True)
    for t in (0, 1):
        tifffile.imwrite(work / "seq" / "a" / f"t000{t}.tif", frame)
    assert run("-i", "seq", "-o", "res", str(ckpt), "--recursive", "--config", "settings.ini")[0] == 0
    assert sorted(p.name for p in (work / "res" / "a").iterdir()) == ["mask0000.tif", "mask0001.tif"]
