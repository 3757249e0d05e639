"""Segment a file or a folder of images: one label image out per image in, no ground truth needed.

    python3 predict.py -i INPUT -o OUTPUT [CHECKPOINT ...]
    python3 predict.py -i data/test -o out/labels --recursive            # subfolders too
    python3 predict.py -i im_test -o out/pred --dice-csv submission.csv  # + the Dice challenge CSV

INPUT is an image file or a folder of them (png, tif/tiff, jpg/jpeg, bmp; 8- or 16-bit; grey, RGB
or RGBA); `--recursive` also reads its subfolders. Hidden files and files named `*_label.*` (label
images beside their images) are not read. Each image's label image (0 background, 1..N nuclei,
labelio.py) goes to OUTPUT under the image's path relative to INPUT, named `<name>_label.tiff`,
or `maskNNNN.tif` for time-lapse frames `tNNNN.tif` (`--naming`, `--format`). A single INPUT file
may also be given an OUTPUT file name ending in .tif, .tiff or .png.

The checkpoint (default: the one [train] checkpoint_dir/current.json names) is the model, exactly
as for valid.py: the same loading (valid.load_members: its [pre], [valid], [post], [dataset]
settings unless config.ini or --config set them), the same tuned [post] values
(tuning.resolve_post), the same inference path (inference.predict_image: padding or tiles, TTA,
ensembles) and the same post-processing. Large images go through tiles of [valid] tile_size, or,
with [valid] max_memory_mb, of the largest size that fits the cap (tile_budget.py).

A file that cannot be read is reported on one line and skipped; the others are written, and the
exit status is 2 at the end. A summary line gives the images, the seconds and the peak memory.
No output may land on an input image, a checkpoint or its tuned file, and OUTPUT may not lie
inside the INPUT folder.

    torchrun --nproc_per_node=4 predict.py -i INPUT -o OUTPUT   # four processes share the files

Under torchrun (distributed.py) process r predicts files r, r + N, ... on its own GPU
(cuda:LOCAL_RANK) or the CPU and writes their label images itself (each atomically, at paths no
other process writes); rank 0 gathers the rest, lists the unreadable files once each, writes the
Dice CSV in the order of one process and prints the summary (the slowest process's seconds, the
largest process's peak memory).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import InputError, load_and_report, run_main
from dataset.io import IMAGE_SUFFIXES, read_image
from dataset.layouts import prediction_percentiles
from distributed import SINGLE, World, main_prints_only, setup
from inference import predict_image
from labelio import LABEL_FORMATS, NAMINGS, TIFF_SUFFIXES, label_name, write_labels
from model.checkpoint import latest_checkpoint
from postprocess import postprocess
from rle import ORDERS, semantic_row, write_dice_submission
from tile_budget import MB, CappedPredictor, measure_budget
from tuning import resolve_post, tuned_path
from valid import each_of_share, load_members, looks_like_checkpoint, together

OUTPUT_FILE_SUFFIXES = TIFF_SUFFIXES + (".png",)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", required=True, help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True,
                        help="the folder for the label images (or, for one input file, a .tif/.tiff/.png file)")
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files (default: the latest)")
    parser.add_argument("--recursive", action="store_true", help="also read the images in INPUT's subfolders")
    parser.add_argument("--format", choices=LABEL_FORMATS, default="tif", help="label image format (default tif)")
    parser.add_argument("--naming", choices=NAMINGS, default="auto",
                        help="label file names: <name>_label (label), maskNNNN for frames tNNNN (mask), "
                             "<name> (same), or mask for frames and label otherwise (auto, the default)")
    parser.add_argument("--dice-csv", metavar="PATH",
                        help="also write the Dice challenge's submission (img,pixels: each image's foreground)")
    parser.add_argument("--dice-order", choices=tuple(ORDERS), default="column",
                        help="pixel numbering of --dice-csv: column (top to bottom, then left to right: the "
                             "challenge's written rule, the default) or row (its sample code's flatten())")
    parser.add_argument("--no-tuned", dest="tuned", action="store_false", help="ignore saved tuned thresholds")
    parser.add_argument("--override-pre", action="store_true",
                        help="use explicit [pre] settings even where they contradict a checkpoint's")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    return parser.parse_args(sys.argv[1:] if argv is None else list(argv))


def list_inputs(source: Path, recursive: bool) -> list[Path]:
    """The image files to predict: `source` itself, or the image files in the folder `source`
    (and its subfolders with `recursive`), sorted; hidden entries and `*_label.*` files are skipped."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InputError(f"{source}: input not found")
    found = source.rglob("*") if recursive else source.iterdir()
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.stem.endswith("_label")
                   and not any(part.startswith(".") for part in p.relative_to(source).parts))
    if not files:
        raise InputError(f"{source}: no image files ({'/'.join(IMAGE_SUFFIXES)})"
                         f"{'' if recursive else ' (--recursive reads subfolders too)'}")
    return files


def output_paths(source: Path, files: list[Path], output: Path, naming: str, fmt: str) -> list[Path]:
    """Where each image's label image goes: OUTPUT/<relative folder>/<label name>, or OUTPUT itself
    for a single input file given an output file name."""
    if source.is_file() and output.suffix.lower() in OUTPUT_FILE_SUFFIXES:
        return [output]
    if output.is_file():
        raise InputError(f"{output}: the output is a file; give a folder")
    root = source.parent if source.is_file() else source
    targets = [output / f.relative_to(root).parent / label_name(f.name, naming, fmt) for f in files]
    seen: dict[Path, Path] = {}
    for image, target in zip(files, targets):
        if target in seen:
            raise InputError(f"{image}: its label image {target} would also be {seen[target]}'s; "
                             f"use --naming label or same")
        seen[target] = image
    return targets


def refuse_overwrite(source: Path, files: list[Path], targets: list[Path], checkpoints: list[Path],
                     dice_csv: str | None) -> None:
    """No output on an input image, a checkpoint or a tuned file, and no output inside the INPUT
    folder (a later run would read the label images as images): one line, before any prediction."""
    protected = {p.resolve() for p in files} | {p.resolve() for p in checkpoints} \
        | {tuned_path(p).resolve() for p in checkpoints}
    if source.is_dir():
        folder = source.resolve()
        for target in targets[:1]:
            if folder in target.resolve().parents:
                raise InputError(f"{target.parent}: the output lies inside the input folder {source}; "
                                 f"choose another output folder")
    for target in targets:
        if target.resolve() in protected:
            raise InputError(f"{target}: would write over an input image or a checkpoint; choose another output")
    if dice_csv is not None:
        path = Path(dice_csv)
        if path.resolve() in protected or (path.is_file() and looks_like_checkpoint(dice_csv)):
            raise InputError(f"{path}: --dice-csv would write over an input image or a checkpoint")
        if path.is_dir():
            raise InputError(f"{path}: --dice-csv names a folder; give a file path")
        if path.resolve() in {t.resolve() for t in targets}:
            raise InputError(f"{path}: --dice-csv is also a label image's path")


def peak_memory(device: torch.device, world: World = SINGLE, capped: CappedPredictor | None = None) -> str:
    """The peak memory of this process, or under torchrun the largest of the processes' peaks
    (every process must call it then). `capped`: the predictor that reset the allocator's peak per
    image and kept the highest itself."""
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        if capped is not None:
            allocated, reserved = max(allocated, capped.peak_allocated), max(reserved, capped.peak_reserved)
        allocated, reserved = world.max(allocated), world.max(reserved)
        return f"peak GPU memory {allocated / MB:.0f} MB allocated, {reserved / MB:.0f} MB reserved" \
            + (" (the largest process's)" if world.size > 1 else "")
    # ru_maxrss is in KiB on Linux
    rss = world.max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return f"peak RSS {rss / 1024:.0f} MB" + (" (the largest process's)" if world.size > 1 else "")


def main(argv=None):
    """predict.py (see the module docstring); under torchrun as one of the processes that share the
    input files (distributed.py)."""
    args = parse_args(argv)
    world = setup()
    try:
        with main_prints_only(world):
            return predict(args, world)
    finally:
        world.close()


def prepare(args, world: World):
    """Inputs, outputs, checkpoints and settings, all checked before any prediction."""
    cfg = load_and_report(args.config)
    source, output = Path(args.input), Path(args.output)
    files = list_inputs(source, args.recursive)
    targets = output_paths(source, files, output, args.naming, args.format)
    paths = [Path(p) for p in args.checkpoints] or [latest_checkpoint(cfg.train.checkpoint_dir)]
    if paths[0] is None:
        raise InputError(f"{cfg.train.checkpoint_dir}: no current.json; name a checkpoint or train first")
    refuse_overwrite(source, files, targets, paths, args.dice_csv)
    members, cfg = load_members(paths, cfg, world.device, args.override_pre)
    post, origin = resolve_post(cfg, paths[0], args.tuned)
    print("[post] " + ", ".join(f"{k} = {getattr(post, k)} ({origin[k]})" for k in origin))
    percentiles = prediction_percentiles(cfg.dataset)  # as the checkpoint's training images were read
    print("input intensities: " + (f"percentiles {percentiles[0]:g} to {percentiles[1]:g}" if percentiles
                                   else "as stored (8-bit), other depths from minimum to maximum")
          + f" ([dataset] normalize = {cfg.dataset.normalize})")
    return cfg, source, output, files, targets, paths, members, post, percentiles


def predict(args, world: World):
    cfg, source, output, files, targets, paths, members, post, percentiles = together(world, prepare, args, world)
    device = world.device
    capped = None
    if cfg.valid.max_memory_mb and cfg.valid.pred_orig_size:
        budget = measure_budget(members, cfg.valid, device, cfg.valid.max_memory_mb)
        capped = CappedPredictor(budget, members, device)
        print(f"memory cap {cfg.valid.max_memory_mb} MB: weights {budget.fixed / MB:.0f} MB, a tile "
              f"{budget.intercept / MB:.0f} MB + {budget.bytes_per_pixel:.0f} bytes a pixel "
              f"({'measured' if device.type == 'cuda' else 'estimated'}); tile sides are chosen per image")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    processes = f" x {world.size} processes (images shared)" if world.grouped else ""
    print(f"{len(members)} checkpoint(s) ({', '.join(p.name for p in paths)}) on {len(files)} image(s) from "
          f"{source}, {device}{processes}, TTA {'on' if cfg.valid.test_time_augment else 'off'}, policy {post.policy}")

    root = source.parent if source.is_file() else source

    def one_image(item) -> dict:
        """Predict one file and write its label image; its record: the error that made it unreadable,
        or its tile side and Dice CSV row."""
        path, target = item
        try:
            image = read_image(path, percentiles)
            if capped is not None:  # an image too large for the cap is reported like an unreadable one
                probs, valid = capped(image, cfg.valid)
        except InputError as exc:
            if not world.grouped:
                tqdm.write(f"error: {exc}", file=sys.stderr)  # as it comes; under torchrun rank 0 lists them
            return {"error": str(exc)}
        if capped is None:
            valid = cfg.valid
            probs = predict_image(members, image, valid, device=device)
        labels = postprocess(probs, post)
        write_labels(target, labels)
        record = {"side": valid.tile_size}
        if args.dice_csv:
            record["dice_row"] = semantic_row(path.relative_to(root).with_suffix("").as_posix(), labels,
                                              args.dice_order)
        return record

    start = time.perf_counter()
    records = each_of_share(world, list(zip(files, targets)), one_image, desc="predicting", unit="image")
    seconds = world.max(time.perf_counter() - start)  # the slowest process's
    memory = peak_memory(device, world, capped)
    # rank 0 holds every process's records: its count is the total, which the others learn by the sum
    n_failed = int(world.sum([sum("error" in r for r in records) if world.main else 0])[0])
    if not world.main:
        if n_failed:
            raise SystemExit(2)  # rank 0 reports them
        return None
    failed = [r["error"] for r in records if "error" in r]
    if world.grouped:
        for message in failed:
            print(f"error: {message}", file=sys.stderr)
    sides = [r["side"] for r in records if "side" in r]
    done = len(files) - len(failed)
    if capped is not None and sides:
        print(f"memory cap {cfg.valid.max_memory_mb} MB: tile sides {min(sides)} to {max(sides)} pixels "
              f"(images up to that size are predicted whole)")
        for line in capped.report():
            print(line)
    if args.dice_csv:
        rows = [r["dice_row"] for r in records if "dice_row" in r]
        write_dice_submission(args.dice_csv, rows)
        print(f"wrote {args.dice_csv} ({len(rows)} images, {args.dice_order}-major pixel numbering)")
    print(f"{done} image(s) -> {output} in {seconds:.1f} s ({seconds / max(done, 1):.2f} s each), "
          f"{memory}" + (f"; {len(failed)} unreadable" if failed else ""))
    if failed:
        raise InputError(f"{len(failed)} of {len(files)} input files could not be read (listed above); "
                         f"the label images of the other {done} are written")
    return done


if __name__ == "__main__":
    run_main(main)
