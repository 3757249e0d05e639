"""Label images out: 0 for background, 1..N for the nuclei, written atomically as TIFF or PNG.

    write_labels("out/img_label.tiff", labels)      # uint16 when N <= 65535, uint32 above
    label_name("t0003.tif", "auto", "tif")          # -> "mask0003.tif" (time-lapse frames)
    label_name("cell_12.png", "auto", "tif")        # -> "cell_12_label.tiff" (image folders)

The ids are renumbered 1..N in increasing order of the ids given (`relabel_sequential`), so the
number of nuclei decides the type: uint16 holds up to 65535 nuclei, uint32 more. PNG holds 16 bits
at most, so a PNG with more nuclei is refused (use TIFF). Every file is written under a temporary
name next to its place and renamed into it (atomic.py). No torch here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from atomic import atomic_path
from config import InputError
from metrics import check_labels

LABEL_FORMATS = ("tif", "png")
NAMINGS = ("auto", "label", "mask", "same")
TIFF_SUFFIXES = (".tif", ".tiff")
FRAME_NAME = re.compile(r"t(\d+)")  # a time-lapse frame: t0000.tif, t0001.tif, ...


def sequential_labels(labels: np.ndarray) -> np.ndarray:
    """Labels (H, W), any non-negative integers, renumbered 1..N (0 stays 0) in the order of the
    ids, as uint16 when N <= 65535 and uint32 otherwise."""
    labels = check_labels(labels, "labels")
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids.size and ids[0] != 0:
        inverse = inverse + 1  # no background pixel: the smallest id still becomes 1, not 0
    n = int(inverse.max()) if inverse.size else 0
    if n > np.iinfo(np.uint32).max:
        raise ValueError(f"{n} nuclei do not fit a 32-bit label image")
    return inverse.astype(np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write a label image to `path` (.tif/.tiff through tifffile, .png through OpenCV), renumbered
    1..N, uint16 or uint32 (see `sequential_labels`). Atomic: `path` holds its old content or the
    whole new file. Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TIFF_SUFFIXES + (".png",):
        raise InputError(f"{path}: label images are written as .tif, .tiff or .png")
    out = sequential_labels(labels)
    if suffix == ".png":
        if out.dtype != np.uint16:
            raise InputError(f"{path}: {int(out.max())} nuclei do not fit a 16-bit PNG; write a TIFF instead")
        import cv2
        ok, data = cv2.imencode(".png", out)
        if not ok:
            raise OSError(f"{path}: OpenCV could not encode the label image")
        with atomic_path(path, ".png") as tmp:
            tmp.write_bytes(data.tobytes())
        return path
    import tifffile
    with atomic_path(path, suffix) as tmp:
        tifffile.imwrite(tmp, out, compression="zlib")
    return path


def label_name(image_name: str, naming: str = "auto", fmt: str = "tif") -> str:
    """The file name of the label image of the image file `image_name`.

    naming: "label": <stem>_label.tiff (or _label.png), the image-folder convention (NeurIPS 2022);
    "mask": mask<NNNN>.tif from a time-lapse frame t<NNNN> (the Cell Tracking Challenge's result
    names, used by AI-HERO); "same": <stem>.tif; "auto": "mask" for frames named t<digits>,
    "label" otherwise. fmt: "tif" or "png".
    """
    if fmt not in LABEL_FORMATS:
        raise InputError(f"label format {fmt!r} is not one of {', '.join(LABEL_FORMATS)}")
    if naming not in NAMINGS:
        raise InputError(f"label naming {naming!r} is not one of {', '.join(NAMINGS)}")
    stem = Path(image_name).stem
    frame = FRAME_NAME.fullmatch(stem)
    if naming == "auto":
        naming = "mask" if frame else "label"
    if naming == "mask":
        if not frame:
            raise InputError(f"{image_name}: mask naming needs time-lapse frames named t<digits> (t0000.tif)")
        return f"mask{frame.group(1)}.{fmt}"
    if naming == "label":
        return f"{stem}_label.{'tiff' if fmt == 'tif' else fmt}"
    return f"{stem}.{fmt}"
