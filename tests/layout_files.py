"""Tiny synthetic datasets in each layout of docs/datasets.md, for the tests and the docs' commands.

    python3 -m tests.layout_files OUT      # writes OUT/dice, OUT/neurips, OUT/aihero, OUT/cellmap

Every writer returns {sample id: int32 labels} of the labelled samples it wrote, so tests can check
that a reader gives back exactly these instances. Images show bright disks (the nuclei) on a dark,
slightly noisy background; the same seed writes the same bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import tifffile


def nuclei(shape: tuple[int, int], rng: np.random.Generator, n: int = 3,
           radius: tuple[int, int] = (4, 7)) -> np.ndarray:
    """int32 labels (H, W) with `n` disks numbered 1..n that neither overlap nor touch."""
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    placed = 0
    for _ in range(200):
        if placed == n:
            break
        r = int(rng.integers(radius[0], radius[1] + 1))
        cy, cx = (int(rng.integers(r + 1, s - r - 1)) for s in shape)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = cv2.dilate(disk.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if (labels[grown] == 0).all():
            placed += 1
            labels[disk] = placed
    assert placed == n, "image too small for that many nuclei"
    return labels


def render(labels: np.ndarray, rng: np.random.Generator, dtype=np.uint8, channels: int = 1,
           high: int | None = None) -> np.ndarray:
    """An image of `labels`: nuclei near `high` (default: most of the dtype's range), background near
    a tenth of it, with noise; (H, W) for one channel, else (H, W, channels)."""
    top = high if high is not None else int(np.iinfo(dtype).max * 0.8)
    base = np.where(labels > 0, top, top // 10).astype(np.float64)
    base += rng.normal(0, top * 0.03, labels.shape)
    image = np.clip(base, 0, np.iinfo(dtype).max).astype(dtype)
    if channels == 1:
        return image
    return np.dstack([image // (c + 1) for c in range(channels)]).astype(dtype)


def write_png(path: Path, array: np.ndarray) -> Path:
    """A PNG of `array` as given (8 or 16 bit; 3 channels in OpenCV's BGR order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, array)
    assert ok, path
    path.write_bytes(data.tobytes())
    return path


def write_tiff(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array)
    return path


def write_dsb(root: Path, n: int = 4, size: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """DSB2018 layout: <id>/images/<id>.png (8-bit RGB) and <id>/masks/mNNN.png (0/255)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        sample_id = f"dsb{i:02d}"
        labels = nuclei((size, size), rng)
        write_png(root / sample_id / "images" / f"{sample_id}.png", render(labels, rng, channels=3))
        for k in range(1, labels.max() + 1):
            write_png(root / sample_id / "masks" / f"m{k:03d}.png", (labels == k).astype(np.uint8) * 255)
        truth[sample_id] = labels
    return truth


def write_im_mask(root: Path, n: int = 4, size: int = 48, seed: int = 0,
                  masks: bool = True) -> dict[str, np.ndarray]:
    """The Dice challenge's layout: im/<name>.png (8-bit RGB) and mask/<name>.png (one 0/255 binary
    mask per image); the disks do not touch, so the masks' connected components are the labels
    (numbered in the order the disks were drawn, not in raster order)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        name = f"{i + 1}"
        labels = nuclei((size, size), rng)
        write_png(root / "im" / f"{name}.png", render(labels, rng, channels=3))
        if masks:
            write_png(root / "mask" / f"{name}.png", (labels > 0).astype(np.uint8) * 255)
            truth[name] = labels
    return truth


def write_timelapse(root: Path, sequences: tuple[str, ...] = ("a", "b", "c"), n_frames: int = 3,
                    size: int = 48, seed: int = 0, unlabelled: tuple[int, ...] = (), seg_folder: bool = True,
                    ground_truth: bool = True) -> dict[str, np.ndarray]:
    """The AI-HERO time-lapse layout: <seq>/tNNNN.tif (16-bit grey frames) and
    <seq>_GT/SEG/man_segNNNN.tif (or <seq>_GT/man_segNNNN.tif without seg_folder) 16-bit label
    images with ids that are not 1..N. Frames whose number is in `unlabelled` get no label image."""
    rng = np.random.default_rng(seed)
    truth = {}
    for seq in sequences:
        gt = root / f"{seq}_GT" / ("SEG" if seg_folder else "")
        for t in range(n_frames):
            labels = nuclei((size, size), rng)
            labels = np.where(labels > 0, labels * 1000 + 7, 0).astype(np.int32)  # ids 1007, 2007, ...
            write_tiff(root / seq / f"t{t:04d}.tif", render(labels, rng, np.uint16, high=3000))
            if ground_truth and t not in unlabelled:
                write_tiff(gt / f"man_seg{t:04d}.tif", labels.astype(np.uint16))
                truth[f"{seq}_t{t:04d}"] = labels
    return truth


def write_label_images(root: Path, n: int = 4, size: int = 48, seed: int = 0, split: bool = False,
                       labels_written: bool = True) -> dict[str, np.ndarray]:
    """The NeurIPS 2022 layout: <name>.<ext> beside <name>_label.tiff (or images/ and labels/ with
    split=True). The images cycle through 16-bit grey TIFF, 8-bit RGB PNG, 8-bit grey BMP, 16-bit
    2-channel TIFF and 8-bit grey JPEG; labels through 16-bit TIFF and 16-bit PNG."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images" if split else root
    label_dir = root / "labels" if split else root
    kinds = [(".tif", np.uint16, 1), (".png", np.uint8, 3), (".bmp", np.uint8, 1), (".tiff", np.uint16, 2),
             (".jpg", np.uint8, 1)]
    truth = {}
    for i in range(n):
        name = f"cell_{i + 1:05d}"
        suffix, dtype, channels = kinds[i % len(kinds)]
        labels = nuclei((size, size), rng)
        image = render(labels, rng, dtype, channels, high=2500 if dtype == np.uint16 else None)
        (write_tiff if suffix in (".tif", ".tiff") else write_png)(image_dir / f"{name}{suffix}", image)
        if labels_written:
            label_suffix = ".tiff" if i % 2 == 0 else ".png"
            writer = write_tiff if label_suffix == ".tiff" else write_png
            writer(label_dir / f"{name}_label{label_suffix}", labels.astype(np.uint16))
            truth[name] = labels
    return truth


def write_examples(out: Path) -> None:
    """The four example datasets of docs/datasets.md under `out`."""
    write_im_mask(out / "dice" / "train", n=6, seed=1)
    write_im_mask(out / "dice" / "test", n=2, seed=2, masks=False)
    write_label_images(out / "neurips" / "train", n=6, seed=3, split=True)
    write_label_images(out / "neurips" / "test", n=3, seed=4, labels_written=False)
    write_timelapse(out / "aihero" / "train", n_frames=3, seed=5, unlabelled=(1,))
    write_timelapse(out / "aihero" / "test", sequences=("d",), n_frames=2, seed=6, ground_truth=False)
    write_label_images(out / "cellmap" / "crops", n=6, seed=7)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m tests.layout_files OUT")
    write_examples(Path(sys.argv[1]))
    print(f"wrote the example datasets to {sys.argv[1]}: dice, neurips, aihero, cellmap")
