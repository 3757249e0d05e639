"""Budgeted accuracy benchmark: train a config for a fixed wall-clock budget, score it, append a row.

    python3 bench/accuracy.py --config configs/cpu_recipe.ini --budget 20
    python3 bench/accuracy.py --classical                     # the Otsu + watershed floor
    python3 bench/accuracy.py --config my.ini --budget 60 --data path/to/stage1_train
    python3 bench/accuracy.py --from-run cpu_recipe --config configs/ablation/no_tta.ini --name no_tta
    python3 bench/accuracy.py --config configs/cpu_recipe_v3.ini --config configs/ablation/caunet.ini
    python3 bench/accuracy.py --config configs/cpu_recipe_v5.ini --budget 20 --scales 3 0.5  # + size test set
    python3 bench/accuracy.py --classical --leave-one-out               # the floor on every held-out family
    python3 bench/accuracy.py --config configs/cpu_recipe_v5.ini --budget 6 --hold-out-family colour_white

On a DSB2018-layout folder (default ../shared/data/dsb2018/stage1_train) it makes a seeded
validation split (10 % of the images; --split-seed, 0 by default, so every row of one seed sees the
same split), holds --tune-images further images out of training as a tune split, trains the config
from scratch for --budget minutes on the rest, tunes the [post] thresholds on the tune split (images
the network never saw, so the thresholds are not flattered by training images), scores the
validation split with the DSB2018 metric, and appends one row to --results (default
docs/results.csv): config, split seed, budget, machine (CPU model, bfloat16 units, threads, torch
version), epochs reached, mean DSB score, the score
per image type, F1 at IoU 0.5, inference seconds per image, the tuning grid and its choice, and
the --valid-args that tuning and scoring ran with.
Rows made before the tune split existed (tune_protocol empty) tuned on training images.

The size test set (`--scales 3 0.5`): the validation split rescaled by each factor (images with
area averaging when they shrink and bilinear interpolation when they grow; masks with nearest
neighbour when they grow, and when they shrink one nucleus at a time by area averaging, kept where
it covers at least half a pixel (`--shrink-truth smooth`, the default since session 15; `nearest`
is the set of earlier rows); a nucleus that vanishes is dropped), scored like the split itself and
added to the row as `dsb_x3`, `dsb_x0.5`, with the shrinking truth in `shrink_truth`. It asks how a
model copes with nuclei of another size than it trained on. At half size a nucleus is 8 or 9
pixels across and nearest neighbour keeps whichever of its boundary pixels the sampling grid
happens to hit: a perfectly size-invariant network loses 0.05 to 0.07 against that truth
(`bench/size_truth.py`, docs/results.md). The rescaled copies are written once, in the DSB2018
layout, under `<work>/scaled/` (named by the split's image ids, the factor and `-smooth` for a
smooth shrink) and reused by every later row on the same split.

Leave one family out (`--hold-out-family colour_white`, or `--leave-one-out` for one row per family):
the images are grouped into families by the fixed rule of `dataset/families.py` (colour or grey,
tinted or white background, bright or dark, image size; families under --min-family images merged
into the nearest), every image of the held-out family is the validation split, the tune split is
drawn (seeded) from the other families and the rest trains. The row's `protocol` column says
'leave one family out' and `family` names the family ('random 10 %' and empty for the seeded
split); the run's folder is `<work>/<name>-<family>`, and `--from-run NAME` then reads
`<work>/<NAME>-<family>`. Score the classical floor on the same family with `--classical
--hold-out-family FAMILY`.

Image types, by a simple rule on the image itself: 'fluorescence' if the three channels are
equal and the median is below 100 (bright nuclei on a dark background); 'brightfield' if the
channels are equal otherwise; 'tissue' if the image has colour (H&E and similar stains).
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atomic import atomic_dir, atomic_path  # noqa: E402
from config import ConfigError, InputError, load_config, read_ini  # noqa: E402
from dataset import split_ids  # noqa: E402
from dataset.families import sample_families  # noqa: E402
from dataset.io import list_samples, read_image, read_sample  # noqa: E402
from metrics import match  # noqa: E402
from postprocess import postprocess  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dsb2018" / "stage1_train"
TYPES = ("fluorescence", "brightfield", "tissue")


def image_type(image: np.ndarray) -> str:
    if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
        return "fluorescence" if np.median(image) < 100 else "brightfield"
    return "tissue"


def link_split(samples, ids: list[str], folder: Path) -> None:
    """A folder of symbolic links to the chosen sample folders (no copies)."""
    folder.mkdir(parents=True)
    by_id = {s.id: s for s in samples}
    for sample_id in ids:
        (folder / sample_id).symlink_to(by_id[sample_id].folder.resolve())


def scaled_name(factor: float) -> str:
    """'x3', 'x0.5': the suffix of a size test set's folder and column."""
    return f"x{factor:g}"


SHRINK_TRUTHS = ("smooth", "nearest")


def nearest_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels rescaled to `shape` (H, W) by nearest neighbour."""
    return cv2.resize(labels.astype(np.int32), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def smooth_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instance labels rescaled to a smaller `shape` one instance at a time with area averaging, each
    kept where it covers at least half of a pixel (later labels win the rare pixel two instances both
    half cover)."""
    out = np.zeros(shape, np.int32)
    for n in np.unique(labels[labels > 0]):
        cover = cv2.resize((labels == n).astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        out[cover >= 0.5] = n
    return out


def rescale_sample(image: np.ndarray, labels: np.ndarray, factor: float,
                   shrink_truth: str = "smooth") -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels rescaled by `factor`: the image with area averaging when it
    shrinks and bilinear interpolation when it grows; the labels with nearest neighbour when they
    grow, and as `shrink_truth` says when they shrink ("smooth": `smooth_labels`)."""
    if shrink_truth not in SHRINK_TRUTHS:
        raise ValueError(f"shrink_truth must be one of {SHRINK_TRUTHS}, got {shrink_truth!r}")
    h, w = labels.shape
    shape = (max(1, round(h * factor)), max(1, round(w * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    smooth = factor < 1 and shrink_truth == "smooth"
    return (cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation),
            smooth_labels(labels, shape) if smooth else nearest_labels(labels, shape))


def scaled_split(samples, ids: list[str], factor: float, root: Path, shrink_truth: str = "smooth") -> Path:
    """The samples `ids` rescaled by `factor`, as a DSB2018-layout folder under `root`, written once.

    The folder is named by the ids, the factor and, for a smooth shrink, `-smooth`, and built under a
    temporary name (atomic_dir), so an existing one is complete and is reused. One mask PNG (fast
    compression level 1) per nucleus left after the rescale.
    """
    digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:10]
    smooth = "-smooth" if factor < 1 and shrink_truth == "smooth" else ""
    folder = root / f"valid-{digest}-{scaled_name(factor)}{smooth}"
    if folder.is_dir():
        return folder
    by_id = {s.id: s for s in samples}
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    try:
        with atomic_dir(folder) as tmp:
            for sample_id in ids:
                image, labels = rescale_sample(*read_sample(by_id[sample_id]), factor, shrink_truth)
                (tmp / sample_id / "images").mkdir(parents=True)
                (tmp / sample_id / "masks").mkdir()
                cv2.imwrite(str(tmp / sample_id / "images" / f"{sample_id}.png"),
                            cv2.cvtColor(image, cv2.COLOR_RGB2BGR), png)
                for n in np.unique(labels[labels > 0]):
                    cv2.imwrite(str(tmp / sample_id / "masks" / f"{n:05d}.png"),
                                (labels == n).astype(np.uint8) * 255, png)
    except InputError:
        if not folder.is_dir():
            raise
        # a row started at the same time on the same split wrote the same copies first: use theirs
    return folder


def merged_settings(configs: list, work: Path) -> Path:
    """The given settings files (later ones win) with the benchmark's folders written over them."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.optionxform = str
    for config in configs:
        if config:
            parser.read_dict(read_ini(Path(config)))  # (parser.read would skip a missing file)
    for section, values in {"dataset": {"root": str(work / "data"), "cache_dir": str(work.parent / "cache")},
                            "train": {"checkpoint_dir": str(work / "checkpoint"), "log_dir": str(work / "runs")}}.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in values.items():
            parser.set(section, key, value)
    path = work / "settings.ini"
    with open(path, "w") as fh:
        parser.write(fh)
    return path


def classical(image: np.ndarray, cfg) -> np.ndarray:
    """Otsu threshold (nuclei taken as the minority side) + distance-transform watershed."""
    from skimage.filters import threshold_otsu
    gray = image.mean(axis=2)
    t = threshold_otsu(gray) if gray.max() > gray.min() else gray.max()
    foreground = gray > t
    if foreground.mean() > 0.5:  # brightfield and tissue: nuclei are the dark minority
        foreground = ~foreground
    return postprocess({"semantic": foreground.astype(np.float32)}, cfg.post)


def append_row(path: Path, row: dict) -> None:
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="settings file to benchmark; repeat it to "
                        "stack files, later ones win (default: config_default.ini alone)")
    parser.add_argument("--budget", type=float, default=20.0, help="training minutes")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="DSB2018-layout folder")
    parser.add_argument("--results", default="docs/results.csv")
    parser.add_argument("--work", default="out/bench", help="folder for splits, checkpoints and logs")
    parser.add_argument("--tune-images", type=int, default=40,
                        help="images held out of training to tune [post] on")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation and tune splits")
    parser.add_argument("--classical", action="store_true", help="score the Otsu + watershed floor instead")
    parser.add_argument("--name", help="row label (default: the config file name)")
    parser.add_argument("--valid-args", default="", help="extra valid.py arguments for tuning and scoring, "
                        "e.g. '--keep-policy'")
    parser.add_argument("--scales", type=float, nargs="+", default=[], metavar="FACTOR",
                        help="also score the validation split rescaled by each factor (size test set), "
                        "as columns dsb_x<FACTOR>, e.g. --scales 3 0.5")
    parser.add_argument("--shrink-truth", choices=SHRINK_TRUTHS, default="smooth",
                        help="masks of a shrunk copy (factor below 1): each nucleus area-averaged and kept "
                        "where it covers half a pixel (smooth, the default), or nearest neighbour (the "
                        "set of rows before session 15)")
    parser.add_argument("--from-run", metavar="NAME", action="append", default=[],
                        help="no training: score the last checkpoint of the earlier run NAME (under --work) with "
                        "--config as extra settings; repeat it to score the ensemble of several runs")
    parser.add_argument("--hold-out-family", metavar="FAMILY", help="leave one family out: validate on every "
                        "image of this family (dataset/families.py) and train and tune on the other families")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="one --hold-out-family row for every family, largest first")
    parser.add_argument("--min-family", type=int, default=10,
                        help="families of fewer images are merged into the nearest one")
    args = parser.parse_args(argv)
    for config in args.config:  # before any folder is made: a misspelt file must not give a default row
        try:
            read_ini(Path(config))
        except ConfigError as exc:
            raise SystemExit(f"error: --config {exc}") from None

    samples = [s for s in list_samples(args.data) if s.mask_paths is not None]
    if not (args.hold_out_family or args.leave_one_out):
        return one_row(args, samples, None, {})
    families = sample_families(samples, args.min_family)
    counts = Counter(families.values())
    if args.hold_out_family and args.hold_out_family not in counts:
        raise SystemExit(f"error: --hold-out-family {args.hold_out_family} is not a family of {args.data} "
                         f"(families: {', '.join(f'{k} ({v})' for k, v in sorted(counts.items()))})")
    if len(counts) < 2:
        raise SystemExit(f"error: {args.data} has one image family only; nothing to leave out")
    held = [args.hold_out_family] if args.hold_out_family else sorted(counts, key=lambda f: (-counts[f], f))
    rows = [one_row(args, samples, family, families) for family in held]
    return rows[0] if args.hold_out_family else rows


def source_run(args, run: str, family: str | None) -> Path:
    """The folder of the earlier row `--from-run run` names: <work>/<run>, or <work>/<run>-<family> for a
    held-out family. Stops with one line when it is not a finished run (no settings.ini or no
    checkpoint folder)."""
    folder = Path(args.work) / (run if family is None else f"{run}-{family}")
    if not (folder / "settings.ini").is_file() or not (folder / "checkpoint").is_dir():
        raise SystemExit(f"error: --from-run {run}: {folder} is not a benchmark run folder (settings.ini and "
                         f"checkpoint/); name the row as it was run (--name), without the family: with "
                         f"--hold-out-family the folder is <name>-<family>")
    return folder


def one_row(args, samples, family: str | None, families: dict[str, str]) -> dict:
    """Split, train (or score the classical floor), tune, score, append and return one row. `family`:
    None for the seeded random 10 % split; else the family left out (`families` maps every id)."""
    if family is None:
        train_ids, valid_ids = split_ids([s.id for s in samples], 0.1, seed=args.split_seed)
    else:
        valid_ids = sorted(i for i, f in families.items() if f == family)
        train_ids = sorted(i for i, f in families.items() if f != family)
    rng = np.random.default_rng(args.split_seed)
    tune_ids = sorted(rng.choice(train_ids, min(args.tune_images, len(train_ids) - 1), replace=False))
    train_ids = sorted(set(train_ids) - set(tune_ids))
    name = args.name or ("classical" if args.classical
                         else "+".join(Path(c).stem for c in args.config) or "defaults")
    work = Path(args.work) / (name if family is None else f"{name}-{family}")
    if name == "scaled":
        raise SystemExit("error: --name scaled is the folder of the size test sets; choose another name")
    if name in args.from_run:
        raise SystemExit(f"error: --name {name} would overwrite the run it scores; choose another name")
    sources = [source_run(args, run, family) for run in args.from_run]  # before any folder is made
    if work.exists():
        shutil.rmtree(work)
    link_split(samples, train_ids, work / "data" / "train")
    link_split(samples, valid_ids, work / "data" / "valid")
    link_split(samples, tune_ids, work / "data" / "tune")
    if any(f <= 0 for f in args.scales):
        raise SystemExit(f"error: --scales needs factors above 0, got {args.scales}")
    scaled = {}
    for factor in args.scales:
        scaled[factor] = scaled_split(samples, valid_ids, factor, Path(args.work) / "scaled", args.shrink_truth)
        (work / "data" / f"valid_{scaled_name(factor)}").symlink_to(scaled[factor].resolve())
    if sources:
        settings = merged_settings([sources[0] / "settings.ini", *args.config], work)
    else:
        settings = merged_settings(args.config, work)
    cfg = load_config(settings, user_path=None)
    types = {s.id: image_type(read_image(s.image_path)) for s in samples if s.id in set(valid_ids)}

    import torch
    from engine import cpu_bf16_units, cpu_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = 0
    budget = 0 if args.classical else args.budget  # a --from-run row: the source run's (below)
    start = time.perf_counter()
    tuned, grid = {}, {}
    if args.classical:
        scores = {}
        for s in samples:
            if s.id in types:
                image, truth = read_sample(s)
                scores[s.id] = match(truth, classical(image, cfg))
        per_image = pd.DataFrame({"image_id": list(scores), "dsb": [v.dsb for v in scores.values()],
                                  "f1": [v.f1 for v in scores.values()]})
        seconds = (time.perf_counter() - start) / len(scores)
        scaled_dsb = {}
        for factor, folder in scaled.items():
            scaled_dsb[factor] = float(np.mean([match(truth, classical(image, cfg)).dsb
                                                for image, truth in map(read_sample, list_samples(folder))]))
    else:
        import train
        import valid
        if args.from_run:
            from model.checkpoint import latest_checkpoint, read_checkpoint
            ckpts = []
            for run, folder in zip(args.from_run, sources):
                # linked into this row's folder, so that the tuned thresholds are saved there
                source = latest_checkpoint(folder / "checkpoint")
                link = work / "checkpoint" / f"{run}-{source.name}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source.resolve())
                ckpts.append(str(link))
            first = read_checkpoint(ckpts[0])
            epochs = first["epoch"]
            budget_s = (first.get("run") or {}).get("budget_s")
            budget = budget_s / 60 if budget_s else ""  # "" where the source run had no budget
        else:
            # [train] n_epoch of the config, stopped early if the budget runs out
            train.main(["--no-resume", "--budget", str(args.budget), "--config", str(settings), "--quiet"])
            from model.checkpoint import latest_checkpoint, read_checkpoint
            ckpts = [str(latest_checkpoint(work / "checkpoint"))]
            epochs = read_checkpoint(ckpts[0])["epoch"]
        valid.main([*ckpts, "--dataset", "tune", "--tune", "--config", str(settings), *args.valid_args.split()])
        start = time.perf_counter()
        valid.main([*ckpts, "--dataset", "valid", "--scores", str(work / "scores.csv"), "--config", str(settings),
                    *args.valid_args.split()])
        seconds = (time.perf_counter() - start) / len(valid_ids)
        per_image = pd.read_csv(work / "scores.csv")
        scaled_dsb = {}
        for factor in scaled:
            name_x = scaled_name(factor)
            valid.main([*ckpts, "--dataset", f"valid_{name_x}", "--scores", str(work / f"scores_{name_x}.csv"),
                        "--config", str(settings), *args.valid_args.split()])
            scaled_dsb[factor] = float(pd.read_csv(work / f"scores_{name_x}.csv")["dsb"].mean())
        from tuning import tuned_path
        record = json.loads(tuned_path(ckpts[0]).read_text())
        tuned = {k: record[k] for k in record["grid"]}
        grid = record["grid"]
    per_image["type"] = per_image["image_id"].map(types)
    config = " + ".join([f"run {run}" for run in args.from_run] + args.config) or "-"
    row = {"name": name, "config": config, "budget_min": budget,
           "machine": f"{os.cpu_count()} cores, {device}, {platform.machine()}"
                      + (f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""), "cpu": cpu_model(),
           "bf16_units": " ".join(k for k, v in cpu_bf16_units().items() if v) or "none",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "epochs": epochs,
           "dsb": per_image["dsb"].mean(), "f1_at_0.5": per_image["f1"].mean(),
           "seconds_per_image": seconds, "n_valid": len(per_image), "split_seed": args.split_seed,
           "protocol": "random 10 %" if family is None else "leave one family out", "family": family or "",
           "n_train": len(train_ids),
           "tune_protocol": f"{len(tune_ids)} held-out images", "tuned": json.dumps(tuned, sort_keys=True),
           "tune_grid": json.dumps(grid, sort_keys=True), "valid_args": args.valid_args}
    for kind in TYPES:
        part = per_image[per_image["type"] == kind]
        row[f"dsb_{kind}"] = part["dsb"].mean() if len(part) else float("nan")
        row[f"n_{kind}"] = len(part)
    for factor, value in scaled_dsb.items():
        row[f"dsb_{scaled_name(factor)}"] = value
    if any(factor < 1 for factor in scaled_dsb):
        row["shrink_truth"] = args.shrink_truth
    append_row(Path(args.results), row)
    print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return row


if __name__ == "__main__":
    main()
