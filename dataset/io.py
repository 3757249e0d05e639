"""Readers for the DSB2018 folder layout, the decoding of every layout's samples, and a disk cache
of decoded samples.

Layout: ``<root>/<id>/images/<id>.png`` and ``<root>/<id>/masks/*.png`` (one binary mask per
nucleus). A sample folder without ``masks/`` is a test image. An optional ``<root>/<id>/group.txt``
names the sample's group (see `dataset.selection.sample_groups`). The other layouts (one binary mask
per image, label images, time-lapse sequences) are found by `dataset.layouts`; their samples are
`SampleFiles` too, with `labels_kind` saying how the labels are stored, and are decoded here. No
torch here.
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


LABELS_KINDS = ("masks", "binary", "labels")


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample, in any layout. `mask_paths` is None for a test image.

    labels_kind: how `mask_paths` store the instances: "masks", one file per nucleus (DSB2018);
    "binary", one binary mask whose connected components are the nuclei; "labels", one label image
    (0 background, each nucleus its own value). `group` keeps samples on one side of a validation
    split: a DSB folder's group.txt, a time-lapse frame's sequence. `percentiles`: (low, high) for
    the per-image percentile normalisation of `read_image`, or None for `to_uint8`. `folder`: the
    DSB sample folder, else the image's folder; `root`: the folder the layout was read from (None
    for a DSB folder, whose root is its parent), see `data_root`.
    """
    id: str
    folder: Path
    image_path: Path
    mask_paths: tuple[Path, ...] | None
    group: str | None = None
    labels_kind: str = "masks"
    percentiles: tuple[float, float] | None = None
    root: Path | None = None

    @property
    def data_root(self) -> Path:
        """The dataset folder that holds every file of this sample (outputs must not go there)."""
        return self.root if self.root is not None else self.folder.parent

    @property
    def paths(self) -> tuple[Path, ...]:
        """The image and label files this sample is decoded from."""
        return (self.image_path, *(self.mask_paths or ()))


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


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile
    try:
        return tifffile.imread(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, IndexError... on damaged files
        raise InputError(f"{path}: not a readable TIFF image ({type(exc).__name__})") from None


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """An image as stored: (H, W) or (H, W, C) with C from 1 to 4, any dtype, colour channels in RGB
    order. TIFF files go through tifffile (16-bit, channel-first and 2-channel files), the others
    through OpenCV. More than one plane (a stack) or more than 4 channels is an InputError."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        array = _read_tiff(path)
        array = np.squeeze(array) if array.ndim > 2 else array
        if array.ndim == 3 and array.shape[0] <= 4 < min(array.shape[1:]):
            array = np.moveaxis(array, 0, 2)  # channel-first (C, H, W)
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[:, :, :3]
        if array.dtype == bool:
            array = array.astype(np.uint8)
    else:
        array = _imread(path)
        if array.ndim == 3 and array.shape[2] in (3, 4):
            array = cv2.cvtColor(array[:, :, :3], cv2.COLOR_BGR2RGB)
    if not (array.ndim == 2 or (array.ndim == 3 and 1 <= array.shape[2] <= 3)) or min(array.shape[:2]) < 1:
        raise InputError(f"{path}: unsupported image shape {array.shape}; expected one 2-D image of 1 to 3 "
                         f"channels (a stack of planes is not one image)")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{path}: unsupported pixel type {array.dtype}")
    return array


def percentile_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stretch an image's `low` to `high` percentile (0-100, over all its pixels and channels at once,
    so colours keep their balance) to 0..255 uint8, clipping outside. An image whose percentiles
    coincide (mostly one value) falls back to its minimum and maximum; a flat image becomes 0."""
    values = array.astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(values, (low, high)))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return np.round(np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 2) or (H, W, 3) to (H, W, 3): one channel is repeated, two
    channels fill red and green (blue stays 0)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 2:
        array = np.dstack([array, np.zeros(array.shape[:2], array.dtype)])
    return np.ascontiguousarray(array)


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


def read_image(path: str | os.PathLike, percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3): RGBA drops alpha, grayscale is repeated.

    percentiles None: 8-bit as stored, other depths stretched from their minimum to maximum
    (`to_uint8`; the DSB2018 reading that trained checkpoints expect). (low, high): any image of 1 to
    3 channels and any depth is stretched by `percentile_uint8`, then made RGB by `to_rgb`.
    """
    path = Path(path)
    if percentiles is not None:
        return to_rgb(percentile_uint8(read_raw(path), *percentiles))
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


def _check_size(array: np.ndarray, path: Path, shape: tuple[int, int], what: str) -> None:
    if array.shape[:2] != shape:
        raise InputError(f"{path}: {what} size {array.shape[1]}x{array.shape[0]} differs from "
                         f"its image size {shape[1]}x{shape[0]}")


def read_label_image(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A label image (0 background, one value per nucleus) as int32 (H, W), its values kept exactly.

    8-, 16- or 32-bit integers (or floats holding whole numbers); a colour file is accepted only when
    its channels are equal. Negative values, fractions or values above int32 are an InputError."""
    path = Path(path)
    array = _read_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else _imread(path)
    array = np.squeeze(array) if array.ndim > 2 else array
    if array.ndim == 3 and array.shape[2] in (3, 4):
        if (array[:, :, :3] != array[:, :, :1]).any():
            raise InputError(f"{path}: label image has colour channels that differ; a label image needs "
                             f"one channel with one integer per nucleus")
        array = array[:, :, 0]
    if array.ndim != 2:
        raise InputError(f"{path}: unsupported label image shape {array.shape}; expected (H, W)")
    _check_size(array, path, shape, "label image")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{path}: unsupported label type {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max
                       or (np.issubdtype(array.dtype, np.floating) and (array != np.round(array)).any())):
        raise InputError(f"{path}: label values must be whole numbers from 0 to {np.iinfo(np.int32).max}")
    return array.astype(np.int32)


def read_binary_labels(path: str | os.PathLike, shape: tuple[int, int], fill_holes: bool) -> np.ndarray:
    """Instances int32 (H, W) from one binary mask: its connected components (8-connected), numbered
    1..N in raster order. Foreground is above half the mask's maximum (in any channel), so 0/1,
    0/255 and anti-aliased 0..255 masks all work. Touching nuclei become one instance; fill_holes
    fills every hole enclosed by the foreground first."""
    path = Path(path)
    array = _read_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else _imread(path)
    array = np.squeeze(array) if array.ndim > 2 else array
    if array.ndim == 3 and array.shape[0] <= 4 < min(array.shape[1:]):
        array = np.moveaxis(array, 0, 2)
    if array.ndim not in (2, 3):
        raise InputError(f"{path}: unsupported mask shape {array.shape}; expected (H, W)")
    _check_size(array, path, shape, "mask")
    values = array.astype(np.float64)
    if values.ndim == 3:
        values = values.max(axis=2)
    foreground = values > values.max() / 2 if values.size and values.max() > 0 else np.zeros(shape, bool)
    if fill_holes:
        foreground = ndimage.binary_fill_holes(foreground)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    return labels.astype(np.int32)


def read_sample(files: SampleFiles, fill_holes: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a sample: RGB uint8 image (H, W, 3) and int32 labels (H, W), or None for a test image.

    Labels by `files.labels_kind`: composed from per-nucleus masks (`compose_labels`), the connected
    components of one binary mask (`read_binary_labels`), or a label image as stored
    (`read_label_image`; `fill_holes` does not change it)."""
    image = read_image(files.image_path, files.percentiles)
    if files.mask_paths is None:
        return image, None
    shape = image.shape[:2]
    if files.labels_kind == "binary":
        return image, read_binary_labels(files.mask_paths[0], shape, fill_holes)
    if files.labels_kind == "labels":
        return image, read_label_image(files.mask_paths[0], shape)
    masks = [read_mask(p, shape) for p in files.mask_paths]
    return image, compose_labels(masks, shape, fill_holes)


def _cache_key(files: SampleFiles, fill_holes: bool) -> str:
    text = f"{CACHE_VERSION}|{fill_holes}|{files.folder.resolve()}"
    if files.labels_kind != "masks" or files.percentiles is not None:
        # DSB2018 samples keep the keys of earlier versions, so their cache stays valid
        text += f"|{files.labels_kind}|{files.percentiles}"
    digest = hashlib.sha1(text.encode())
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


def derived_cached(files: SampleFiles, fill_holes: bool, cache_dir: str | os.PathLike, tag: str, compute):
    """An array computed from the decoded sample by a deterministic `compute()`, through the same disk
    cache as `read_sample_cached`: keyed by that sample's key and `tag` (which must name every
    setting `compute` reads), written atomically, recomputed when the entry is damaged."""
    digest = hashlib.sha1(tag.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{_cache_key(files, fill_holes)}-{digest}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
    array = compute()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    except OSError:
        pass
    return array
