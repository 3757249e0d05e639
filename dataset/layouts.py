"""The folder layouts a dataset may come in, their detection, and the data-split CSV. No torch here.

Every layout yields `dataset.io.SampleFiles`, so targets, augmentation, training, validation and
the decode cache see one kind of sample whatever the folder looked like:

- ``dsb2018``: ``<id>/images/<id>.png`` and ``<id>/masks/*.png``, one mask per nucleus
  (`dataset.io.list_samples`).
- ``im_mask``: ``im/<name>.png`` and ``mask/<name>.png``, one binary mask per image; its connected
  components are the nuclei, so touching nuclei merge. Without ``mask/``, test images.
- ``timelapse``: ``<seq>/tNNNN.tif`` frames and ``<seq>_GT/SEG/man_segNNNN.tif`` (or
  ``<seq>_GT/man_segNNNN.tif``) label images. Frames without a label image are left out when the
  sequence has a ``_GT`` folder; a sequence without one gives test frames. A frame's group is its
  sequence, so a validation split keeps whole sequences on one side.
- ``label_images``: ``<name>.{tif,tiff,png,bmp,jpg}`` beside ``<name>_label.{tif,tiff,png}``, or
  ``images/<name>.*`` with ``labels/<name>_label.*``. Without any label file, test images.

A data-split CSV (`read_split_csv`, `write_split_csv`) names one sample per row: its usage (train,
valid or test), its path (a DSB sample folder or an image file; relative paths are taken from the
CSV's folder) and, optionally, its layout.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path

from config import Config, DatasetConfig, InputError
from dataset.io import IMAGE_SUFFIXES, SampleFiles, list_samples

LAYOUTS = ("dsb2018", "im_mask", "timelapse", "label_images")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
FRAME = re.compile(r"t(\d+)\.tiff?", re.IGNORECASE)
MAN_SEG = re.compile(r"man_seg(\d+)\.tiff?", re.IGNORECASE)
NOT_SEQUENCES = ("im", "mask", "images", "labels")
USAGES = {"train": "train", "valid": "valid", "validate": "valid", "validation": "valid", "test": "test"}
SPLIT_COLUMNS = ("usage", "layout", "path")
RULES = ("dsb2018: <id>/images/ folders; im_mask: an im/ folder; timelapse: <seq>/tNNNN.tif frames; "
         "label_images: image files (or an images/ folder) with <name>_label files")


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _is_label_name(path: Path) -> bool:
    return path.stem.endswith("_label") and path.suffix.lower() in LABEL_SUFFIXES


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found")


def matching_layouts(folder: str | os.PathLike) -> list[str]:
    """The layouts whose signature `folder` shows (see the module docstring), in `LAYOUTS` order."""
    folder = Path(folder)
    _check_folder(folder)
    entries = _entries(folder)
    dirs = [p for p in entries if p.is_dir()]
    found = []
    if any((d / "images").is_dir() for d in dirs if d.name != "images"):
        found.append("dsb2018")
    if (folder / "im").is_dir():
        found.append("im_mask")
    # the named folders of the other layouts may hold frame-like names (t0001.png) without being sequences
    if any(any(FRAME.fullmatch(f.name) for f in d.iterdir()) for d in dirs if d.name not in NOT_SEQUENCES):
        found.append("timelapse")
    if any(_is_image(p) for p in entries) or (folder / "images").is_dir() and any(
            _is_image(p) for p in (folder / "images").iterdir()):
        found.append("label_images")
    return found


def detect_layout(folder: str | os.PathLike) -> str:
    """The one layout `folder` matches; none or several is an InputError naming the folder."""
    found = matching_layouts(folder)
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{folder}: matches none of the dataset layouts ({RULES}); see docs/datasets.md")
    raise InputError(f"{folder}: matches several dataset layouts ({', '.join(found)}); "
                     f"set [dataset] layout to the one it is")


def percentiles_for(cfg: DatasetConfig, layout: str) -> tuple[float, float] | None:
    """The (low, high) percentiles `read_image` stretches a `layout` image by, or None for the
    DSB2018 reading (`dataset.io.to_uint8`), as `[dataset] normalize` says."""
    if cfg.normalize == "percentile" or (cfg.normalize == "auto" and layout != "dsb2018"):
        return (cfg.percentile_low, cfg.percentile_high)
    return None


def settle_normalize(cfg: Config, samples: list[SampleFiles]) -> Config:
    """`cfg` with `[dataset] normalize = auto` replaced by what it meant for `samples` (the training
    samples, all of one normalisation): percentile or range. A checkpoint saved with the result
    tells `prediction_percentiles` how the network saw its images, whatever folder it predicts."""
    if cfg.dataset.normalize != "auto" or not samples:
        return cfg
    return cfg.replace("dataset", normalize="range" if samples[0].percentiles is None else "percentile")


def prediction_percentiles(cfg: DatasetConfig) -> tuple[float, float] | None:
    """The `read_image` percentiles for an image read outside any layout (a folder of images to
    predict) with a checkpoint's `[dataset]` settings: (low, high) for percentile, None for range
    and for auto, which a checkpoint only holds when it was trained before `settle_normalize`
    existed, on DSB2018 images read as stored."""
    return (cfg.percentile_low, cfg.percentile_high) if cfg.normalize == "percentile" else None


def _one_per_stem(paths: list[Path], folder: Path, what: str) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in paths:
        if path.stem in by_stem:
            raise InputError(f"{folder}: two {what} share the name {path.stem} ({by_stem[path.stem].name}, "
                             f"{path.name})")
        by_stem[path.stem] = path
    return by_stem


def _im_mask_samples(root: Path, percentiles) -> list[SampleFiles]:
    im_dir, mask_dir = root / "im", root / "mask"
    if not im_dir.is_dir():
        raise InputError(f"{root}: no im/ folder (layout im_mask: im/ and mask/)")
    images = _one_per_stem([p for p in _entries(im_dir) if _is_image(p)], im_dir, "images")
    if not images:
        raise InputError(f"{im_dir}: holds no image files")
    masks = None
    if mask_dir.is_dir():
        files = []
        for entry in _entries(mask_dir):
            if not _is_image(entry):
                raise InputError(f"{entry}: not a mask image; mask/ may hold only {'/'.join(IMAGE_SUFFIXES)} files")
            files.append(entry)
        masks = _one_per_stem(files, mask_dir, "masks")
        for stem in sorted(set(masks) - set(images)):
            raise InputError(f"{masks[stem]}: mask without an image of that name in {im_dir}")
        for stem in sorted(set(images) - set(masks)):
            raise InputError(f"{images[stem]}: image without a mask of that name in {mask_dir}")
    return [SampleFiles(stem, im_dir, path, None if masks is None else (masks[stem],), None, "binary",
                        percentiles, root) for stem, path in sorted(images.items())]


def _frames(folder: Path) -> dict[int, Path]:
    frames: dict[int, Path] = {}
    for entry in _entries(folder):
        match = FRAME.fullmatch(entry.name) if entry.is_file() else None
        if match:
            number = int(match.group(1))
            if number in frames:
                raise InputError(f"{folder}: frames {frames[number].name} and {entry.name} have one number")
            frames[number] = entry
    return frames


def _label_frames(gt: Path) -> dict[int, Path]:
    folder = gt / "SEG" if (gt / "SEG").is_dir() else gt
    labels: dict[int, Path] = {}
    for entry in _entries(folder):
        match = MAN_SEG.fullmatch(entry.name) if entry.is_file() else None
        if match:
            number = int(match.group(1))
            if number in labels:
                raise InputError(f"{folder}: label images {labels[number].name} and {entry.name} have one number")
            labels[number] = entry
    if not labels:
        raise InputError(f"{folder}: holds no man_segNNNN.tif label images")
    return labels


def _timelapse_samples(root: Path, percentiles) -> list[SampleFiles]:
    dirs = [p for p in _entries(root) if p.is_dir()]
    names = {d.name for d in dirs}
    samples = []
    for gt in dirs:
        if gt.name.endswith("_GT") and gt.name[:-3] not in names:
            raise InputError(f"{gt}: ground truth of a sequence {gt.name[:-3]} that {root} lacks")
    for seq in dirs:
        if seq.name.endswith(("_GT", "_ST")):
            continue
        frames = _frames(seq)
        if not frames:
            raise InputError(f"{seq}: holds no tNNNN.tif frames (layout timelapse)")
        gt = root / f"{seq.name}_GT"
        labels = _label_frames(gt) if gt.is_dir() else None
        if labels is not None:
            for number in sorted(set(labels) - set(frames)):
                raise InputError(f"{labels[number]}: label image without a frame t{number:04d} in {seq}")
        for number, frame in sorted(frames.items()):
            if labels is not None and number not in labels:
                continue  # frames without labels do not train or validate
            label = None if labels is None else (labels[number],)
            samples.append(SampleFiles(f"{seq.name}_{frame.stem}", seq, frame, label, seq.name, "labels",
                                       percentiles, root))
    if not samples:
        raise InputError(f"{root}: holds no sequence folder with tNNNN.tif frames")
    return samples


def _label_images_samples(root: Path, percentiles) -> list[SampleFiles]:
    split = (root / "images").is_dir()
    image_dir = root / "images" if split else root
    label_dir = root / "labels" if split else root
    entries = _entries(image_dir)
    images = _one_per_stem([p for p in entries if _is_image(p) and not _is_label_name(p)], image_dir, "images")
    if not images:
        raise InputError(f"{image_dir}: holds no image files")
    label_files = [p for p in (_entries(label_dir) if label_dir.is_dir() else []) if p.is_file()
                   and _is_label_name(p)]
    labels = _one_per_stem(label_files, label_dir, "label images")
    if labels:
        for stem in sorted(labels):
            if stem.removesuffix("_label") not in images:
                raise InputError(f"{labels[stem]}: label image without an image {stem.removesuffix('_label')}.* "
                                 f"in {image_dir}")
        for stem in sorted(images):
            if f"{stem}_label" not in labels:
                raise InputError(f"{images[stem]}: image without a label image {stem}_label.tif/.tiff/.png "
                                 f"in {label_dir}")
    return [SampleFiles(stem, image_dir, path, (labels[f"{stem}_label"],) if labels else None, None, "labels",
                        percentiles, root) for stem, path in sorted(images.items())]


def layout_samples(folder: str | os.PathLike, cfg: DatasetConfig, layout: str | None = None) -> list[SampleFiles]:
    """All samples of `folder`, sorted by id, in `layout` (default `[dataset] layout`; auto detects
    it). A malformed folder is an InputError naming the file or folder."""
    folder = Path(folder)
    _check_folder(folder)
    layout = layout or cfg.layout
    if layout == "auto":
        layout = detect_layout(folder)
    percentiles = percentiles_for(cfg, layout)
    if layout == "dsb2018":
        samples = list_samples(folder)
        if percentiles is not None:
            samples = [dataclasses.replace(s, percentiles=percentiles) for s in samples]
        return samples
    reader = {"im_mask": _im_mask_samples, "timelapse": _timelapse_samples,
              "label_images": _label_images_samples}[layout]
    samples = reader(folder, percentiles)
    return sorted(samples, key=lambda s: s.id)


def _layout_root(layout: str, path: Path) -> Path:
    """The folder a `layout` sample at `path` (a DSB sample folder or an image file) is listed from."""
    if layout == "dsb2018":
        return path.parent
    if layout in ("im_mask", "timelapse"):
        return path.parent.parent
    return path.parent.parent if path.parent.name == "images" else path.parent


def read_split_csv(path: str | os.PathLike, cfg: DatasetConfig) -> dict[str, list[SampleFiles]]:
    """{'train': [...], 'valid': [...], 'test': [...]} from a data-split CSV.

    Columns: usage (train, valid or validate, test), path (a DSB sample folder or an image file,
    relative to the CSV's folder unless absolute) and optionally layout (else `[dataset] layout`,
    which must then not be auto). Each row's sample is found by reading its layout's folder, so it
    gets that layout's labels, group and normalisation. An unreadable file, a missing column or path,
    an unknown usage or layout, a path that is no sample, or two rows of one sample: InputError."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = list(reader)
    except FileNotFoundError:
        raise InputError(f"{path}: split CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: unreadable split CSV ({exc})") from None
    for column in ("usage", "path"):
        if column not in columns:
            raise InputError(f"{path}: split CSV has no {column} column (columns: {', '.join(columns)})")
    if not rows:
        raise InputError(f"{path}: split CSV has no rows")
    parts: dict[str, list[SampleFiles]] = {"train": [], "valid": [], "test": []}
    listed: dict[tuple[str, Path], dict[Path, SampleFiles]] = {}
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        where = f"{path} row {number}"
        usage = USAGES.get((row.get("usage") or "").strip().lower())
        if usage is None:
            raise InputError(f"{where}: usage {row.get('usage')!r} is not one of train, valid (or validate), test")
        layout = (row.get("layout") or "").strip() or cfg.layout
        if layout == "auto":
            raise InputError(f"{where}: no layout column value, and [dataset] layout is auto; "
                             f"add a layout column or set [dataset] layout")
        if layout not in LAYOUTS:
            raise InputError(f"{where}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        text = (row.get("path") or "").strip()
        if not text:
            raise InputError(f"{where}: empty path")
        sample_path = Path(text) if Path(text).is_absolute() else path.parent / text
        if not sample_path.exists():
            raise InputError(f"{where}: {sample_path} not found")
        root = _layout_root(layout, sample_path)
        key = (layout, root.resolve())
        if key not in listed:
            listed[key] = {(s.folder if layout == "dsb2018" else s.image_path).resolve(): s
                           for s in layout_samples(root, cfg, layout)}
        files = listed[key].get(sample_path.resolve())
        if files is None:
            raise InputError(f"{where}: {sample_path} is not a sample of layout {layout} in {root} "
                             f"(a frame without a label image, or the wrong layout?)")
        if files.id in seen:
            raise InputError(f"{where}: sample {files.id} is also on row {seen[files.id]}; "
                             f"every sample (id) may appear once")
        seen[files.id] = number
        parts[usage].append(files)
    return parts


def split_csv_path(files: SampleFiles, layout: str, csv_folder: Path) -> str:
    """The path column of one sample: its DSB folder or image file, relative to the CSV's folder."""
    target = files.folder if layout == "dsb2018" else files.image_path
    return Path(os.path.relpath(target.resolve(), csv_folder.resolve())).as_posix()


def write_split_csv(path: str | os.PathLike, parts: dict[str, list[SampleFiles]], layout: str) -> None:
    """Write a data-split CSV (columns usage, layout, path) atomically; `parts` maps a usage to samples."""
    from atomic import atomic_path
    path = Path(path)
    try:
        with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(SPLIT_COLUMNS)
            for usage, samples in parts.items():
                for files in samples:
                    writer.writerow((usage, layout, split_csv_path(files, layout, path.parent)))
    except OSError as exc:
        raise InputError(f"{exc.filename or path}: cannot write the split CSV ({exc.strerror or exc})") from None
