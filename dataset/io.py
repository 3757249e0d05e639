"""Readers for the DSB2018 folder layout, and a disk cache of decoded samples.

Layout: ``<root>/<id>/images/<id>.png`` and ``<root>/<id>/masks/*.png`` (one binary mask per
nucleus). A sample folder without ``masks/`` is a test image. An optional ``<root>/<id>/group.txt``
names the sample's group (see `dataset.selection.sample_groups`). No torch here.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from atomic import atomic_path
from config import InputError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
CACHE_VERSION = "2"  # bump when the decoded output changes (2: hole filling spares other nuclei)
GROUP_FILE = "group.txt"


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample folder. `mask_paths` is None for a test image; `group` is the text of
    the folder's group.txt, or None without one."""
    id: str
    folder: Path
    image_path: Path
    mask_paths: tuple[Path, ...] | None
    group: str | None = None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_files(folder: Path) -> tuple[Path, ...]:
    """The mask images in `folder`, sorted. Hidden entries (.DS_Store, editor files) are ignored;
    anything else that is not an image file is refused, since a mask saved in another format
    would otherwise go missing from the labels without a word."""
    masks = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{entry}: not a mask image; masks/ may hold only "
                             f"{'/'.join(IMAGE_SUFFIXES)} files (and hidden files, which are ignored)")
        masks.append(entry)
    return tuple(masks)


def read_group_file(folder: Path) -> str | None:
    """The one-line group name in `folder`/group.txt, or None without that file."""
    path = folder / GROUP_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: a group file must be UTF-8 text") from None
    if not text or "\n" in text:
        raise InputError(f"{path}: a group file must hold one non-empty line (the group name)")
    return text


def sample_files(folder: str | os.PathLike) -> SampleFiles:
    """Find the image and mask files of one sample folder; a malformed folder is an InputError."""
    folder = Path(folder)
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise InputError(f"{folder}: no images/ folder in this sample")
    images = _image_files(images_dir)
    if len(images) != 1:
        raise InputError(f"{images_dir}: expected exactly one image, found {len(images)}")
    masks_dir = folder / "masks"
    masks = _mask_files(masks_dir) if masks_dir.is_dir() else None
    return SampleFiles(folder.name, folder, images[0], masks, read_group_file(folder))


def list_samples(root: str | os.PathLike) -> list[SampleFiles]:
    """All sample folders under `root`, sorted by id. A missing or empty root is an InputError."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{root}: dataset folder holds no sample folders")
    return [sample_files(f) for f in folders]


def _imread(path: Path) -> np.ndarray:
    # cv2.imread does not take every path encoding; decoding the bytes does
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    array = None
    if data.size:
        # a damaged file makes OpenCV log lines of its own to stderr; the InputError below says it
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        finally:
            cv2.utils.logging.setLogLevel(level)
    if array is None:
        raise InputError(f"{path}: not a readable image")
    return array


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale any integer or float image to uint8; 8-bit input is returned unchanged.

    16-bit and float microscopy images rarely use their full range, so they are stretched from
    their own minimum to maximum.
    """
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3): RGBA drops alpha, grayscale is repeated, 16-bit scaled."""
    path = Path(path)
    array = _imread(path)
    if array.ndim == 2:
        array = np.repeat(to_uint8(array)[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        array = cv2.cvtColor(to_uint8(array[:, :, :3]), cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(to_uint8(array), 3, axis=2)
    else:
        raise InputError(f"{path}: unsupported image shape {array.shape}")
    return np.ascontiguousarray(array)


def mask_inside(array: np.ndarray, path: Path) -> np.ndarray:
    """bool (H, W): the non-zero pixels (in any channel) of one nucleus mask as read from `path`.

    A mask may use any one non-zero value (1, 255, 65535, a colour): 0/1, 0/255 and 16-bit masks
    all work. More than one distinct non-zero value means a label image (several nuclei in one
    file, or an anti-aliased drawing), which would be read as one nucleus: an InputError.
    """
    inside = array != 0 if array.ndim == 2 else (array != 0).any(axis=2)
    values = array[inside]  # (N,) or (N, channels)
    if values.size and (values != values[0]).any():
        n_values = len(np.unique(values, axis=0))
        raise InputError(f"{path}: mask holds {n_values} different non-zero values (a label image?); "
                         f"masks/ needs one file per nucleus, each with a single non-zero value")
    return inside


def read_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read one nucleus mask as bool (H, W); its non-zero pixels are inside (see `mask_inside`)."""
    path = Path(path)
    array = _imread(path)
    if array.shape[:2] != shape:
        raise InputError(f"{path}: mask size {array.shape[1]}x{array.shape[0]} differs from "
                         f"its image size {shape[1]}x{shape[0]}")
    mask = mask_inside(array, path)
    if not mask.any():
        raise InputError(f"{path}: mask is empty")
    return mask


def compose_labels(masks: list[np.ndarray], shape: tuple[int, int], fill_holes: bool) -> np.ndarray:
    """Instance label map int32 (H, W): mask i (in the given order) gets id i + 1, 0 is background.

    Where masks overlap, the earlier mask keeps the pixel, so the result does not depend on
    anything but the order. A mask fully covered by earlier ones leaves its id unused.
    fill_holes: the holes of each mask join it afterwards, but only on pixels that no mask covers,
    so a ring-shaped mask never takes the nucleus inside it; a hole pixel enclosed by several masks
    goes to the one with the smallest filled area (the innermost).
    """
    labels = np.zeros(shape, np.int32)
    holes = []
    for index, mask in enumerate(masks, start=1):
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        crop = mask[box]
        target = labels[box]
        target[crop & (target == 0)] = index
        if fill_holes:
            filled = ndimage.binary_fill_holes(crop)
            if (filled != crop).any():
                holes.append((int(filled.sum()), index, box, filled & ~crop))
    for _, index, box, hole in sorted(holes, key=lambda h: h[:2]):
        target = labels[box]
        target[hole & (target == 0)] = index
    return labels


def read_sample(files: SampleFiles, fill_holes: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a sample: RGB uint8 image (H, W, 3) and int32 labels (H, W), or None for a test image."""
    image = read_image(files.image_path)
    if files.mask_paths is None:
        return image, None
    masks = [read_mask(p, image.shape[:2]) for p in files.mask_paths]
    return image, compose_labels(masks, image.shape[:2], fill_holes)


def _cache_key(files: SampleFiles, fill_holes: bool) -> str:
    digest = hashlib.sha1(f"{CACHE_VERSION}|{fill_holes}|{files.folder.resolve()}".encode())
    for path in (files.image_path, *(files.mask_paths or ())):
        stat = path.stat()
        digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def atomic_save_npz(path: Path, **arrays) -> None:
    """Write an uncompressed .npz under a temporary name next to `path`, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_sample_cached(files: SampleFiles, fill_holes: bool, cache_dir: str | os.PathLike | None):
    """`read_sample`, through a disk cache keyed by file names, sizes and modification times.

    Safe with several DataLoader workers: each entry is written under a temporary name and renamed,
    so a reader sees a whole file or none; two workers writing the same entry write the same bytes.
    """
    if cache_dir is None:
        return read_sample(files, fill_holes)
    path = Path(cache_dir) / f"{_cache_key(files, fill_holes)}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return data["image"], (data["labels"] if "labels" in data else None)
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is decoded again and overwritten below
    image, labels = read_sample(files, fill_holes)
    arrays = {"image": image} if labels is None else {"image": image, "labels": labels}
    try:
        atomic_save_npz(path, **arrays)
    except OSError:
        pass  # a read-only or full cache folder only costs speed
    return image, labels
