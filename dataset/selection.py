"""Which samples are used and which validate: the CSV whitelist, sample groups, the seeded split,
and group-balancing weights. No torch here, so split.py, crop.py and preview.py start quickly.

Groups keep samples that share pixels or time on one side of the validation split: the tiles that
crop.py cuts from one image overlap, and frames of one time-lapse sequence are near copies, so a
validation score over samples whose group is also trained on would flatter the model.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config, DatasetConfig, InputError
from dataset.io import SampleFiles
from dataset.layouts import layout_samples, read_split_csv

FILTER_COLUMNS = ("source", "major_category", "sub_category")
PARENT_COLUMN = "parent_id"


def split_ids(ids: list[str], cv_ratio: float, seed: int,
              groups: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Seeded split of sample ids into (train, valid), both sorted; a group never straddles it.

    `groups` maps an id to its group name; an id it lacks is a group of its own (so a parent image
    whose id is its tiles' group joins them). Whole groups, visited in a seeded random order, go to
    valid while each one brings the valid count closer to round(len(ids) * cv_ratio). With a
    positive ratio and at least two groups, each side gets at least one group. The result depends
    only on the set of ids, their groups, the ratio and the seed; without groups (or with one id
    per group) it is the plain per-id split of earlier versions, so fixed splits stay fixed.
    """
    ids = sorted(ids)
    group_of = {i: (groups.get(i, i) if groups is not None else i) for i in ids}
    sizes = Counter(group_of.values())
    names = sorted(sizes)
    target = int(round(len(ids) * cv_ratio))
    if cv_ratio > 0 and len(names) >= 2:
        target = min(max(target, 1), len(ids) - 1)
    order = [names[k] for k in np.random.default_rng(seed).permutation(len(names))]
    chosen: set[str] = set()
    count = 0
    for name in order:
        if count >= target or len(chosen) == len(names) - 1:
            break
        if abs(count + sizes[name] - target) < target - count:
            chosen.add(name)
            count += sizes[name]
    if not chosen and target > 0 and len(names) >= 2:
        # every group overshoots the target on its own: take the one that overshoots least
        chosen.add(min(order, key=lambda name: sizes[name]))
    valid = {i for i in ids if group_of[i] in chosen}
    return [i for i in ids if i not in valid], [i for i in ids if i in valid]


def read_whitelist(path: str | os.PathLike) -> pd.DataFrame:
    """The CSV whitelist, indexed by image_id. Unreadable file or missing column: InputError."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: CSV file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: unreadable CSV ({str(exc).splitlines()[0]})") from None
    if "image_id" not in table.columns:
        raise InputError(f"{path}: CSV has no image_id column (columns: {', '.join(table.columns)})")
    return table.drop_duplicates("image_id").set_index("image_id")


def apply_whitelist(samples: list[SampleFiles], cfg: DatasetConfig,
                    table: pd.DataFrame | None) -> list[SampleFiles]:
    """Keep the samples whose CSV row matches every non-empty filter of `[dataset]`."""
    if table is None:
        return samples
    keep = table
    for column in FILTER_COLUMNS:
        wanted = getattr(cfg, column)
        if not wanted:
            continue
        if column not in table.columns:
            raise InputError(f"{cfg.csv_file}: [dataset] {column} filters on a column the CSV lacks")
        keep = keep[keep[column].isin(wanted)]
    return [s for s in samples if s.id in keep.index]


def sample_groups(samples: list[SampleFiles], table: pd.DataFrame | None = None,
                  csv_path: str | os.PathLike | None = None) -> dict[str, str]:
    """{sample id: group name}, for `split_ids`.

    A sample's group is, in this order: the line in its folder's group.txt (crop.py writes the
    source image's group there, so tiles of tiles keep the original image's group, and the file
    travels with the folder through split.py); else, when a CSV `table` is given, the root of its
    parent_id chain (crop.py's CSV rows name each tile's parent; a time-lapse CSV can name the
    sequence); else the sample's own id. A parent_id chain that loops is an InputError naming
    `csv_path`.
    """
    parents: dict[str, str] = {}
    if table is not None and PARENT_COLUMN in table.columns:
        parents = {str(i): p for i, p in table[PARENT_COLUMN].items() if p}
    groups = {}
    for files in samples:
        if files.group is not None:
            groups[files.id] = files.group
            continue
        name, seen = files.id, {files.id}
        while name in parents:
            name = parents[name]
            if name in seen:
                raise InputError(f"{csv_path}: the {PARENT_COLUMN} chain of {files.id} loops back to {name}")
            seen.add(name)
        groups[files.id] = name
    return groups


def balance_weights(samples: list[SampleFiles], table: pd.DataFrame, column: str,
                    csv_path: str) -> np.ndarray:
    """Sampling weights (float64, one per sample) that draw every value of `column` equally often."""
    if column not in table.columns:
        raise InputError(f"{csv_path}: [dataset] group_column {column!r} is not a CSV column")
    values = [table.at[s.id, column] if s.id in table.index else "" for s in samples]
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def training_split(cfg: Config) -> tuple[list[SampleFiles], list[SampleFiles]]:
    """(train, valid) samples: root/train and root/valid (each in `[dataset] layout`), or the train
    and valid rows of `[dataset] split_csv` instead; without valid samples, a seeded cv_ratio split
    of the train samples that keeps every group (`sample_groups`: a time-lapse sequence, crop.py's
    tiles of one image) on one side. The CSV whitelist (csv_file) filters both."""
    data = cfg.dataset
    root = Path(data.root)
    table = read_whitelist(data.csv_file) if data.csv_file else None
    if data.split_csv:
        parts = read_split_csv(data.split_csv, data)
        where, listed, valid = data.split_csv, parts["train"], parts["valid"]
        if not listed:
            raise InputError(f"{data.split_csv}: split CSV has no train rows")
    else:
        where, listed = root / "train", layout_samples(root / "train", data)
        valid = layout_samples(root / "valid", data) if (root / "valid").is_dir() else []
    train = apply_whitelist(listed, data, table)
    if not train:
        raise InputError(f"{where}: no sample is left after the CSV whitelist {data.csv_file}")
    if valid:
        valid = apply_whitelist(valid, data, table)
        check_no_leak(train, valid, where, data.split_csv or root / "valid")
        return train, valid
    groups = sample_groups(train, table, data.csv_file)
    train_ids, valid_ids = split_ids([s.id for s in train], data.cv_ratio, data.split_seed, groups)
    chosen = set(valid_ids)
    return [s for s in train if s.id not in chosen], [s for s in train if s.id in chosen]


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def check_no_leak(train: list[SampleFiles], valid: list[SampleFiles], train_where, valid_where) -> None:
    """InputError when a validation sample is also trained on: the same image file content on both
    sides (a copy or a hard link, whatever its name), or two crop.py tiles of one source image
    (the group in their folders' group.txt). Validation scores over such samples flatter the model.
    Only files whose sizes match are hashed, so the check costs little."""
    by_size = defaultdict(list)
    for files in train:
        by_size[files.image_path.stat().st_size].append(files)
    train_digests = {}
    for files in valid:
        same_size = by_size.get(files.image_path.stat().st_size, ())
        digest = _digest(files.image_path) if same_size else None
        for other in same_size:
            if other.id not in train_digests:
                train_digests[other.id] = _digest(other.image_path)
            if train_digests[other.id] == digest:
                raise InputError(f"{valid_where}: validation image {files.image_path.name} ({files.id}) is also a "
                                 f"training image ({other.image_path} in {train_where}); a score over images the "
                                 f"network trains on flatters it: remove it from one side, or make a fresh split "
                                 f"(split.py --force)")
    tiles = {files.group: files for files in train if files.group is not None and files.labels_kind == "masks"}
    for files in valid:
        other = tiles.get(files.group) if files.labels_kind == "masks" else None
        if other is not None:
            raise InputError(f"{valid_where}: validation sample {files.id} and training sample {other.id} "
                             f"({train_where}) are tiles of one image (group {files.group} in their group.txt); "
                             f"its overlapping pixels would be scored after training on them: keep a group on "
                             f"one side (split.py splits by group)")


def named_samples(cfg: Config, name: str) -> list[SampleFiles]:
    """The samples valid.py's --dataset `name` reads: with `[dataset] split_csv`, the rows of that
    usage (valid: the split training validates on); else root/<name> in `[dataset] layout`, and for
    valid without that folder the validation part of `training_split`."""
    if cfg.dataset.split_csv:
        if name not in ("train", "valid", "test"):
            raise InputError(f"--dataset {name}: with [dataset] split_csv, name train, valid or test")
        if name == "valid":
            return training_split(cfg)[1]
        samples = read_split_csv(cfg.dataset.split_csv, cfg.dataset)[name]
        if not samples:
            raise InputError(f"{cfg.dataset.split_csv}: split CSV has no {name} rows")
        return samples
    folder = Path(cfg.dataset.root) / name
    if name == "valid" and not folder.is_dir():
        return training_split(cfg)[1]
    return layout_samples(folder, cfg.dataset)
