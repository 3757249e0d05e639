"""Split a dataset folder into `<out>/train` and `<out>/valid`, the layout `[dataset] root` reads, or
write the split as a data-split CSV (`[dataset] split_csv`) instead.

    python3 split.py data/stage1_train [--out data] [--ratio 0.1] [--seed 0] [--csv data/v9.csv]
                     [--force] [--copy] [--config PATH]
    python3 split.py data/crops --split-csv data/split.csv [--ratio 0.1] [--seed 0] [--force]

The source may be in any layout of `[dataset] layout` (docs/datasets.md; auto detects it). With
--split-csv, one row per sample (usage train or valid, layout, path relative to the CSV's folder)
is written atomically and no file is linked.

Samples are chosen with `dataset.split_ids` (the same seeded split training uses without a valid/
folder), after the CSV whitelist and its `[dataset]` filters, and whole groups at a time: all tiles
that crop.py cut from one image (and any samples sharing a group, see `dataset.sample_groups`) land
on the same side, as do the frames of one time-lapse sequence. Every file of a DSB sample folder (group.txt
included), or the image and label files of a sample of another layout at their paths under the
source, is hard-linked, so the split costs no disk space; where links are impossible (another filesystem) the files are copied. Both
folders are built under temporary names (`<out>/.train.tmp-XXXX`, atomic.atomic_dir) and renamed
into place at the end, so an interrupted run leaves no half split; list_samples skips dot-folders.
No torch here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from atomic import atomic_dir, check_output_folders
from config import DatasetConfig, InputError, load_and_report, run_main
from dataset.layouts import detect_layout, layout_samples, write_split_csv
from dataset.selection import apply_whitelist, read_whitelist, sample_groups, split_ids

PARTS = ("train", "valid")


class _Linker:
    """Hard-links files, switching once (with one line of output) to copying when links fail."""

    def __init__(self, copy: bool):
        self.copy = copy
        self.n_linked = 0
        self.n_copied = 0

    def __call__(self, src: Path, dst: Path) -> None:
        if not self.copy:
            try:
                os.link(src, dst)
                self.n_linked += 1
                return
            except OSError as exc:
                # EXDEV across filesystems, EPERM on some network/FAT mounts: linking will not work
                # for the other files either
                print(f"hard links are not possible here ({exc.strerror or exc}); copying instead")
                self.copy = True
        shutil.copy2(src, dst)
        self.n_copied += 1


def choose_split(source: Path, ratio: float, seed: int, table, cfg_dataset: DatasetConfig):
    """(layout, {id: SampleFiles}, train ids, valid ids) of `source`, after the whitelist, whole groups
    at a time; a split with an empty side is an InputError."""
    if not 0 < ratio < 1:
        raise InputError(f"--ratio {ratio}: must be between 0 and 1 (exclusive)")
    layout = cfg_dataset.layout if cfg_dataset.layout != "auto" else detect_layout(source)
    samples = layout_samples(source, cfg_dataset, layout)
    kept = apply_whitelist(samples, cfg_dataset, table)
    if len(kept) < len(samples):
        print(f"CSV whitelist {cfg_dataset.csv_file}: kept {len(kept)} of {len(samples)} samples")
    by_id = {s.id: s for s in kept}
    groups = sample_groups(kept, table, cfg_dataset.csv_file)
    train_ids, valid_ids = split_ids(list(by_id), ratio, seed, groups)
    if not train_ids or not valid_ids:
        raise InputError(f"{source}: {len(kept)} sample(s) in {len(set(groups.values()))} group(s) "
                         f"cannot be split into a non-empty train and valid part with --ratio {ratio}")
    return layout, by_id, train_ids, valid_ids


def split_to_csv(source: str | os.PathLike, csv_path: str | os.PathLike, ratio: float, seed: int,
                 table, cfg_dataset: DatasetConfig, force: bool = False) -> tuple[int, int]:
    """Write the split of `source` as a data-split CSV at `csv_path` (replacing one only with
    `force`); returns (number of train samples, number of valid samples)."""
    source, csv_path = Path(source), Path(csv_path)
    if csv_path.is_dir():
        raise InputError(f"{csv_path}: --split-csv names a folder; give a file path")
    if csv_path.exists() and not force:
        raise InputError(f"{csv_path}: already exists; add --force to replace it")
    layout, by_id, train_ids, valid_ids = choose_split(source, ratio, seed, table, cfg_dataset)
    write_split_csv(csv_path, {"train": [by_id[i] for i in train_ids], "valid": [by_id[i] for i in valid_ids]},
                    layout)
    return len(train_ids), len(valid_ids)


def split_dataset(source: str | os.PathLike, out: str | os.PathLike, ratio: float, seed: int,
                  table, cfg_dataset: DatasetConfig, force: bool = False,
                  copy: bool = False) -> tuple[int, int]:
    """Link (or copy) the samples of `source` into `<out>/train` and `<out>/valid`.

    table: the whitelist DataFrame from `read_whitelist` (indexed by image_id) or None for every
    sample; `cfg_dataset` supplies its source / major_category / sub_category filters.
    Returns (number of train samples, number of valid samples). Bad input: InputError, nothing
    written. With `force`, an existing train/ and valid/ are replaced, but only once the new split
    is complete. Samples of one group (`dataset.sample_groups`) go to the same side.
    """
    source, out = Path(source), Path(out)
    if not 0 < ratio < 1:
        raise InputError(f"--ratio {ratio}: must be between 0 and 1 (exclusive)")
    check_output_folders(source, [out / part for part in PARTS], force)
    layout, by_id, train_ids, valid_ids = choose_split(source, ratio, seed, table, cfg_dataset)

    link = _Linker(copy)
    try:
        with ExitStack() as stack:
            # both are renamed into place (valid/, then train/) only once both are complete
            for part, ids in zip(PARTS, (train_ids, valid_ids)):
                building = stack.enter_context(atomic_dir(out / part, replace=force))
                for sample_id in ids:
                    files = by_id[sample_id]
                    if layout != "dsb2018":
                        # the image and label files at their places under the source: the same layout
                        for path in files.paths:
                            target = building / path.relative_to(source)
                            target.parent.mkdir(parents=True, exist_ok=True)
                            link(path, target)
                        continue
                    for dirpath, _, filenames in os.walk(files.folder):
                        target = building / sample_id / Path(dirpath).relative_to(files.folder)
                        target.mkdir(parents=True, exist_ok=True)
                        for name in filenames:
                            link(Path(dirpath, name), target / name)
    except OSError as exc:  # unwritable --out, full disk: the user's to fix
        raise InputError(f"{exc.filename or out}: cannot write the split ({exc.strerror or exc})") from None
    if link.n_linked:
        print(f"hard-linked {link.n_linked} files: no extra disk space; editing a file in place "
              f"also changes it in {source}")
    if link.n_copied:
        print(f"copied {link.n_copied} files")
    return len(train_ids), len(valid_ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="dataset folder in any layout, e.g. data/stage1_train")
    parser.add_argument("--out", help="folder to hold train/ and valid/ (default: the source's parent)")
    parser.add_argument("--split-csv", help="write the split to this data-split CSV instead of linking "
                                            "train/ and valid/ folders")
    parser.add_argument("--ratio", type=float, help="validation fraction (default: [dataset] cv_ratio)")
    parser.add_argument("--seed", type=int, help="split seed (default: [dataset] split_seed)")
    parser.add_argument("--csv", help="whitelist CSV (default: [dataset] csv_file; '' for none)")
    parser.add_argument("--force", action="store_true", help="replace an existing train/ and valid/ "
                                                               "(or --split-csv file)")
    parser.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    args = parser.parse_args(argv)

    cfg = load_and_report(args.config)
    csv_file = cfg.dataset.csv_file if args.csv is None else (args.csv or None)
    # the filters' error messages name cfg_dataset.csv_file, so it must be the file actually read
    cfg_dataset = dataclasses.replace(cfg.dataset, csv_file=csv_file)
    table = read_whitelist(csv_file) if csv_file else None
    source = Path(args.source)
    out = Path(args.out) if args.out else source.resolve().parent
    ratio = cfg.dataset.cv_ratio if args.ratio is None else args.ratio
    seed = cfg.dataset.split_seed if args.seed is None else args.seed
    if args.split_csv:
        if args.out or args.copy:
            raise InputError("--split-csv writes no folders: leave out --out and --copy")
        n_train, n_valid = split_to_csv(source, args.split_csv, ratio, seed, table, cfg_dataset, args.force)
        print(f"split {source} (ratio {ratio}, seed {seed}, whole groups): train {n_train}, valid {n_valid} "
              f"-> {args.split_csv}")
        return
    n_train, n_valid = split_dataset(source, out, ratio, seed, table, cfg_dataset, args.force, args.copy)
    print(f"split {source} (ratio {ratio}, seed {seed}, whole groups): train {n_train} -> {out / 'train'}, "
          f"valid {n_valid} -> {out / 'valid'}")


if __name__ == "__main__":
    run_main(main)
