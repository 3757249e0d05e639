"""Split a DSB2018-layout folder into `<out>/train` and `<out>/valid`, the layout `[dataset] root` reads.

    python3 split.py data/stage1_train [--out data] [--ratio 0.1] [--seed 0] [--csv data/v9.csv]
                     [--force] [--copy] [--config PATH]

Samples are chosen with `dataset.split_ids` (the same seeded split training uses without a valid/
folder), after the CSV whitelist and its `[dataset]` filters. Every file of a sample folder is hard-
linked, so the split costs no disk space; where links are impossible (another filesystem) the files
are copied. Both folders are built under temporary names (`<out>/.train.tmp-XXXX`) and renamed into
place at the end, so an interrupted run leaves no half split; list_samples skips dot-folders.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from config import DatasetConfig, InputError, load_and_report, run_main
from dataset import apply_whitelist, read_whitelist, split_ids
from dataset.io import list_samples

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


def _check_folders(source: Path, out: Path, force: bool) -> None:
    """Refuse layouts where building or --force would read from or delete the source."""
    src = source.resolve()
    for part in PARTS:
        target = (out / part).resolve()
        if src.is_relative_to(target):
            raise InputError(f"{source}: the source is the split's own {part}/ folder; "
                             f"give another --out")
        if target.is_relative_to(src):
            raise InputError(f"{out / part}: the split would be written inside the source "
                             f"folder {source}; give another --out")
        if os.path.lexists(out / part):
            if not force:
                raise InputError(f"{out / part}: already exists; use --force to replace "
                                 f"{out / 'train'} and {out / 'valid'}")
            if (out / part).is_symlink() or not (out / part).is_dir():
                raise InputError(f"{out / part}: not a plain folder; remove it yourself")


def split_dataset(source: str | os.PathLike, out: str | os.PathLike, ratio: float, seed: int,
                  table, cfg_dataset: DatasetConfig, force: bool = False,
                  copy: bool = False) -> tuple[int, int]:
    """Link (or copy) the samples of `source` into `<out>/train` and `<out>/valid`.

    table: the whitelist DataFrame from `read_whitelist` (indexed by image_id) or None for every
    sample; `cfg_dataset` supplies its source / major_category / sub_category filters.
    Returns (number of train samples, number of valid samples). Bad input: InputError, nothing
    written. With `force`, an existing train/ and valid/ are removed, but only once the new split
    is complete.
    """
    source, out = Path(source), Path(out)
    if not 0 < ratio < 1:
        raise InputError(f"--ratio {ratio}: must be between 0 and 1 (exclusive)")
    _check_folders(source, out, force)
    samples = list_samples(source)
    kept = apply_whitelist(samples, cfg_dataset, table)
    if len(kept) < len(samples):
        print(f"CSV whitelist {cfg_dataset.csv_file}: kept {len(kept)} of {len(samples)} samples")
    by_id = {s.id: s for s in kept}
    train_ids, valid_ids = split_ids(list(by_id), ratio, seed)
    if not train_ids or not valid_ids:
        raise InputError(f"{source}: {len(kept)} sample(s) cannot be split into a non-empty "
                         f"train and valid part with --ratio {ratio}")

    link = _Linker(copy)
    built: list[Path] = []  # temporary folders, then (once renamed) the final ones
    try:
        out.mkdir(parents=True, exist_ok=True)
        for part, ids in zip(PARTS, (train_ids, valid_ids)):
            built.append(Path(tempfile.mkdtemp(prefix=f".{part}.tmp-", dir=out)))
            for sample_id in ids:
                folder = by_id[sample_id].folder
                for dirpath, _, filenames in os.walk(folder):
                    target = built[-1] / sample_id / Path(dirpath).relative_to(folder)
                    target.mkdir(parents=True, exist_ok=True)
                    for name in filenames:
                        link(Path(dirpath, name), target / name)
        for part in PARTS:
            if (out / part).is_dir():
                shutil.rmtree(out / part)
        for index, part in enumerate(PARTS):
            os.rename(built[index], out / part)
            built[index] = out / part
    except BaseException as exc:
        # also undoes a train/ already renamed into place when valid/ could not follow it
        for folder in built:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, OSError):  # unwritable --out, full disk: the user's to fix
            raise InputError(f"{exc.filename or out}: cannot write the split "
                             f"({exc.strerror or exc})") from None
        raise
    if link.n_linked:
        print(f"hard-linked {link.n_linked} files: no extra disk space; editing a file in place "
              f"also changes it in {source}")
    if link.n_copied:
        print(f"copied {link.n_copied} files")
    return len(train_ids), len(valid_ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="DSB2018-layout folder, e.g. data/stage1_train")
    parser.add_argument("--out", help="folder to hold train/ and valid/ (default: the source's parent)")
    parser.add_argument("--ratio", type=float, help="validation fraction (default: [dataset] cv_ratio)")
    parser.add_argument("--seed", type=int, help="split seed (default: [dataset] split_seed)")
    parser.add_argument("--csv", help="whitelist CSV (default: [dataset] csv_file; '' for none)")
    parser.add_argument("--force", action="store_true", help="replace an existing train/ and valid/")
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
    n_train, n_valid = split_dataset(source, out, ratio, seed, table, cfg_dataset, args.force, args.copy)
    print(f"split {source} (ratio {ratio}, seed {seed}): train {n_train} -> {out / 'train'}, "
          f"valid {n_valid} -> {out / 'valid'}")


if __name__ == "__main__":
    run_main(main)
