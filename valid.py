"""Predict, score and export: checkpoint ensembles, TTA, instances, DSB scores, figures, RLE CSV.

    python3 valid.py --dataset valid                   # side-by-side figures, per-image scores, mean
    python3 valid.py ckptA.pkl ckptB.pkl --csv         # ensemble two checkpoints, write a submission
    python3 valid.py --dataset valid --tune            # grid-search [post] thresholds, save them
    python3 valid.py --dataset test --dice-csv dice.csv  # the Dice challenge's submission (img,pixels)
    python3 valid.py --dataset valid --metric all      # every score: DSB, Dice, border-free F1, instance Dice
    %matplotlib inline; %run valid.py --dataset valid  # figures inline in a notebook
    torchrun --nproc_per_node=4 valid.py --dataset test --csv  # four processes share the images

With no checkpoint, the one named by [train] checkpoint_dir/current.json is used. The checkpoint
is the model: every setting it was trained with (its [pre] preprocessing, [valid], [post],
[dataset], [target]) applies unless config.ini or --config sets that key explicitly; an explicit
[pre] setting that contradicts a checkpoint is refused unless --override-pre. Each checkpoint of an
ensemble gets its input prepared with its own [pre]. Images come from [dataset] root/<dataset>;
`--dataset valid` without a valid/ folder uses the held-out split that train.py uses. Thresholds
tuned with --tune are saved next to the first checkpoint (<checkpoint>.post.json) and used from then
on (an explicit [post] setting still wins) unless --no-tuned is given.

Scores (metrics.py): the table always holds the DSB2018 score, precision, recall and F1 at IoU 0.5
and the semantic Dice; `--metric` names the headline score, by default the one of the data's layout
(dsb2018: dsb; im_mask, the Dice challenge: dice; label_images, NeurIPS 2022: f1_border; timelapse,
AI-HERO: instance_dice), and adds the f1_border and instance_dice columns when named (all: both).
With [valid] max_memory_mb the tile size is chosen per image to fit the cap (tile_budget.py).

Under torchrun (distributed.py) process r predicts images r, r + N, ... on its own GPU (cuda:LOCAL_RANK)
or the CPU and writes their figures, mask folders and label images itself; rank 0 gathers the
per-image results and alone prints and writes the score table, the CSV files and the tuned
thresholds (from every image's maps), in the image order of one process: the same files as one
process writes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from atomic import atomic_dir, atomic_path
from config import Config, InputError, load_and_report, run_main, under_saved
from dataset.selection import named_samples
from dataset.io import read_sample_cached
from distributed import World, interleave, main_prints_only, setup, stop_together
from inference import Member, predict_image
from labelio import LABEL_FORMATS, write_labels
from metrics import EXTRA_COLUMNS, extra_scores, match, mean_scores, score_table
from model.checkpoint import latest_checkpoint, load_model
from postprocess import postprocess
from rle import ORDERS, labels_to_rows, semantic_row, write_dice_submission, write_submission
from tuning import grid_for, resolve_post, tune, tuned_path, write_tuned

CHECKPOINT_SUFFIXES = (".pkl", ".pt", ".pth", ".ckpt")
# [pre] keys that change what the network is fed at prediction time (width: with pred_orig_size off;
# nucleus_diameter: with size_norm on)
PRE_AT_PREDICTION = ("stretch", "clahe", "width", "size_norm", "nucleus_diameter")
FIGURES = "out/figures"
METRICS = ("dsb", "dice", "f1_border", "instance_dice", "all")
# the score each challenge ranks by, for the layout its data comes in (docs/predict.md)
METRIC_OF_LAYOUT = {"dsb2018": "dsb", "im_mask": "dice", "label_images": "f1_border", "timelapse": "instance_dice"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files (default: the latest)")
    parser.add_argument("--dataset", default="test", help="train, valid or test: a folder under [dataset] root")
    parser.add_argument("--csv", nargs="?", const="submission.csv", metavar="PATH",
                        help="write a run-length encoded submission (default PATH: submission.csv)")
    parser.add_argument("--save", nargs="?", const=FIGURES, metavar="DIR",
                        help=f"write the side-by-side figures to DIR (default {FIGURES})")
    parser.add_argument("--show", action="store_true", help="show the figures (inline in a notebook)")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="no figures (they are made by default unless an output below is asked for)")
    parser.add_argument("--masks", metavar="DIR", help="write predicted instances as DSB-layout mask PNGs")
    parser.add_argument("--labels", metavar="DIR", help="write one label image <id>.tif per image (labelio.py)")
    parser.add_argument("--label-format", choices=LABEL_FORMATS, default="tif", help="--labels as tif or png")
    parser.add_argument("--dice-csv", metavar="PATH",
                        help="write the Dice challenge's submission (img,pixels: each image's foreground)")
    parser.add_argument("--dice-order", choices=tuple(ORDERS), default="column",
                        help="pixel numbering of --dice-csv: column (top to bottom, then left to right: the "
                             "challenge's written rule, the default) or row (its sample code's flatten())")
    parser.add_argument("--metric", choices=METRICS,
                        help="headline score (default: the one of the data's layout); f1_border, "
                             "instance_dice and all add their columns to the table")
    parser.add_argument("--scores", metavar="PATH", help="write the per-image score table as CSV")
    parser.add_argument("--tune", action="store_true", help="grid-search [post] on this labelled set and save it")
    parser.add_argument("--keep-policy", action="store_true", help="--tune only the thresholds, keep [post] policy")
    parser.add_argument("--tune-workers", type=int, default=usable_cpus(), metavar="N",
                        help="processes that post-process the --tune grid (default: the CPUs this process may use)")
    parser.add_argument("--no-tuned", dest="tuned", action="store_false", help="ignore saved tuned thresholds")
    parser.add_argument("--override-pre", action="store_true",
                        help="use explicit [pre] settings even where they contradict a checkpoint's")
    parser.add_argument("--trained-weights", action="store_true",
                        help="predict with a checkpoint's trained weights instead of their moving average "
                        "([train] ema_decay), e.g. to measure what the average adds")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.tune_workers < 1:
        parser.error(f"--tune-workers: {args.tune_workers}: give 1 or more")
    return reclaim_checkpoints(args, argv)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def looks_like_checkpoint(path: str) -> bool:
    """A checkpoint by its name, or an existing file in torch's zip or pickle format."""
    if Path(path).suffix.lower() in CHECKPOINT_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def reclaim_checkpoints(args, argv: list[str]):
    """`--csv` and `--save` take an optional value, so `--csv ckptA.pkl ckptB.pkl` would make
    ckptA.pkl the submission's path and write over it. A value that is a checkpoint goes back to
    the checkpoints, in command-line order, and the option takes its default."""
    for option, default in (("csv", "submission.csv"), ("save", FIGURES)):
        value = getattr(args, option)
        if value is not None and value != default and looks_like_checkpoint(value):
            args.checkpoints.append(value)
            setattr(args, option, default)
    position = {arg: i for i, arg in reversed(list(enumerate(argv)))}
    args.checkpoints.sort(key=lambda p: position.get(p, len(argv)))
    return args


def refuse_overwrite(args, inputs: list[Path], samples) -> None:
    """No output may land on a checkpoint, a tuned file or the folders of the images read."""
    protected = {p.resolve() for p in inputs} | {tuned_path(p).resolve() for p in inputs}
    for option in ("csv", "scores", "dice_csv"):
        value = getattr(args, option)
        if value is None:
            continue
        path = Path(value)
        if path.resolve() in protected or (path.is_file() and looks_like_checkpoint(value)):
            raise InputError(f"{path}: --{option.replace('_', '-')} would write over a checkpoint; give another path")
        if path.is_dir():
            raise InputError(f"{path}: --{option.replace('_', '-')} names a folder; give a file path")
    read = {s.data_root.resolve() for s in samples}
    for option in ("save", "masks", "labels"):
        value = getattr(args, option)
        if value is None:
            continue
        folder = Path(value).resolve()
        if folder in protected or (folder.is_file()):
            raise InputError(f"{value}: --{option} needs a folder, and this is a file")
        if any(folder == data or data in folder.parents for data in read):
            raise InputError(f"{value}: --{option} would write into the images being read")


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_members(paths: list[Path], cfg: Config, device, override_pre: bool,
                 trained: bool = False) -> tuple[list[Member], Config]:
    """Each checkpoint's model with the [pre] it was trained with, and the settings for this run:
    the first checkpoint's settings under the user's explicit ones (config.under_saved).
    `trained`: the trained weights instead of their moving average (model.checkpoint.load_model)."""
    members, settings = [], None
    for path in paths:
        model, state = load_model(path, device, trained)
        ours, taken = under_saved(cfg, state.get("config") or {}, str(path))
        for key in PRE_AT_PREDICTION:
            source = cfg.source_of("pre", key)
            saved = (state.get("config") or {}).get("pre", {}).get(key)
            if key == "width" and ours.valid.pred_orig_size:
                continue  # the width matters only when images are resized to it
            if key == "nucleus_diameter" and not ours.pre.size_norm:
                continue  # the diameter matters only when images are brought to it
            if source is not None and saved is not None and saved != getattr(cfg.pre, key) and not override_pre:
                raise InputError(f"{source}: [pre] {key} = {getattr(cfg.pre, key)}, but {path} was trained with "
                                 f"{saved}; remove the setting, or pass --override-pre to predict with it anyway")
        members.append(Member(model.eval(), ours.pre, path.name))
        shown = [f"[{s}] {k} = {v}" for s, k, v in taken
                 if s in ("pre", "valid", "dataset", "target") and (settings is None or s == "pre")]
        if shown:
            print(f"settings from checkpoint {path.name}: " + ", ".join(shown))
        if settings is None:
            settings = ours
    return members, settings


def dataset_samples(cfg: Config, name: str):
    return named_samples(cfg, name)


def semantic_iou(truth: np.ndarray, labels: np.ndarray) -> float:
    union = np.count_nonzero((truth > 0) | (labels > 0))
    return 1.0 if union == 0 else np.count_nonzero((truth > 0) & (labels > 0)) / union


def in_notebook() -> bool:
    """True inside a Jupyter kernel whose figures are drawn inline."""
    if "ipykernel" not in sys.modules:
        return False
    import matplotlib
    return "inline" in matplotlib.get_backend().lower()


def draw(image, truth, labels, probs, title: str):
    """Input, ground truth, predicted instances, contours over the input, and each head's map."""
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb
    from skimage.segmentation import mark_boundaries

    panels = [("input", image), ("prediction", label2rgb(labels, bg_label=0)),
              ("contours", mark_boundaries(image, labels, color=(1, 1, 0)))]
    if truth is not None:
        panels.insert(1, ("ground truth", label2rgb(truth, bg_label=0)))
    panels += [(f"{k} map", v) for k, v in probs.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1 if picture.ndim == 2 else None)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=80)


def write_masks(folder: Path, sample_id: str, image: np.ndarray, labels: np.ndarray) -> None:
    """One DSB-layout sample folder: images/<id>.png and masks/<n>.png, renamed into place whole."""
    import cv2
    with atomic_dir(folder / sample_id, replace=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        cv2.imwrite(str(tmp / "images" / f"{sample_id}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        for n in range(1, int(labels.max()) + 1):
            cv2.imwrite(str(tmp / "masks" / f"{n:04d}.png"), (labels == n).astype(np.uint8) * 255)


def default_metric(cfg: Config, name: str) -> tuple[str, str]:
    """(metric, why): the score of the challenge whose layout the data is in; dsb when unknown."""
    from dataset.layouts import detect_layout
    layout = cfg.dataset.layout
    if layout == "auto":
        root = Path(cfg.dataset.root)
        for folder in (root / name, root / "train"):
            if folder.is_dir():
                try:
                    layout = detect_layout(folder)
                except InputError:
                    continue
                break
    if layout not in METRIC_OF_LAYOUT:
        return "dsb", "the layout is not known"
    return METRIC_OF_LAYOUT[layout], f"layout {layout}"


def each_of_share(world: World, items: list, work, **bar) -> list | None:
    """work(item) for this process's share of `items` (positions rank, rank + size, ...), with a
    progress bar on rank 0 only; the results of all items, in their order, on rank 0 and None on
    the other processes. One process: every item, its errors raised as they come. Under torchrun
    an InputError stops every process and is reported once: the one of the earliest item, which a
    single process would have met first."""
    results, error = [], None
    for index in tqdm(range(world.rank, len(items), world.size), disable=not world.main, **bar):
        try:
            results.append(work(items[index]))
        except InputError as exc:
            if not world.grouped:
                raise
            error = (index, str(exc))
            break
    stop_together(world, error)
    parts = world.gather(results)
    return interleave(parts) if world.main else None


def together(world: World, step, *args):
    """step(*args) in every process; an InputError in any of them stops all, reported once."""
    if not world.grouped:
        return step(*args)
    result, error = None, None
    try:
        result = step(*args)
    except InputError as exc:
        error = (-1, str(exc))
    stop_together(world, error)
    return result


def main(argv=None):
    """valid.py (see the module docstring); under torchrun as one of the processes that share the
    images (distributed.py), rank 0 printing and writing the merged tables and CSV files."""
    args = parse_args(argv)
    world = setup()
    try:
        with main_prints_only(world):
            return validate(args, world)
    finally:
        world.close()


def prepare(args, world: World):
    """Settings, checkpoints and images of the run, checked before any prediction."""
    if args.show and world.size > 1:
        raise InputError("--show draws the figures of one process; run valid.py without torchrun, "
                         "or write them with --save")
    cfg = load_and_report(args.config)
    paths = [Path(p) for p in args.checkpoints] or [latest_checkpoint(cfg.train.checkpoint_dir)]
    if paths[0] is None:
        raise InputError(f"{cfg.train.checkpoint_dir}: no current.json; name a checkpoint or train first")
    members, cfg = load_members(paths, cfg, world.device, args.override_pre, args.trained_weights)
    post, origin = resolve_post(cfg, paths[0], args.tuned and not args.tune)
    print("[post] " + ", ".join(f"{k} = {getattr(post, k)} ({origin[k]})" for k in origin))
    samples = dataset_samples(cfg, args.dataset)
    refuse_overwrite(args, paths, samples)
    return cfg, paths, members, post, samples


def validate(args, world: World):
    cfg, paths, members, post, samples = together(world, prepare, args, world)
    device = world.device
    heads = set().union(*(m.model.heads for m in members))
    if post.semantic_only:
        heads = {"semantic"}  # the other maps are not read: their thresholds are not tuned
    processes = f" x {world.size} processes (images shared)" if world.grouped else ""
    print(f"{len(members)} checkpoint(s) ({', '.join(p.name for p in paths)}) on {len(samples)} "
          f"{args.dataset} images, {device}{processes}, TTA {'on' if cfg.valid.test_time_augment else 'off'}, "
          f"policy {post.policy}")

    metric, why = (args.metric, "--metric") if args.metric else default_metric(cfg, args.dataset)
    extra = EXTRA_COLUMNS if metric == "all" else tuple(c for c in EXTRA_COLUMNS if c == metric)
    capped = None
    if cfg.valid.max_memory_mb and cfg.valid.pred_orig_size:
        from tile_budget import CappedPredictor, measure_budget
        capped = CappedPredictor(measure_budget(members, cfg.valid, device, cfg.valid.max_memory_mb), members, device)

    outputs = args.csv or args.masks or args.labels or args.scores or args.tune or args.dice_csv
    figures = args.show or args.save or (args.figures and not outputs)
    show, folder = False, None
    if figures:
        import matplotlib
        show = args.show or (in_notebook() and not args.save)
        if not show:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if args.save or not show:
            folder = Path(args.save or FIGURES)
            print(f"side-by-side figures -> {folder}")

    def one_image(files) -> dict:
        """Predict one image and write its own files (figure, masks, label image): a record of what
        the tables and CSV files need."""
        image, truth = read_sample_cached(files, cfg.target.fill_holes, cfg.dataset.cache_dir)
        sizes = {}
        if capped is not None:
            probs, _ = capped(image, cfg.valid, sizes=sizes)
        else:
            probs = predict_image(members, image, cfg.valid, device=device, sizes=sizes)
        record = {"id": files.id, "factors": {name: factor for name, (_, factor) in sizes.items()}}
        if args.tune:
            if truth is None:
                raise InputError(f"{files.folder}: --tune needs labelled images (masks/)")
            record["kept"] = (probs, truth)
            return record
        labels = postprocess(probs, post)
        title = f"{files.id[:16]}: {int(labels.max())} nuclei"
        if truth is not None:
            record["score"] = match(truth, labels)
            record["extra"] = extra_scores(truth, labels, extra)
            title += f", IoU {semantic_iou(truth, labels):.3f}, DSB score {record['score'].dsb:.3f}"
        record["rows"] = labels_to_rows(files.id, labels)
        if args.dice_csv:
            record["dice_row"] = semantic_row(files.id, labels, args.dice_order)
        if args.masks:
            write_masks(Path(args.masks), files.id, image, labels)
        if args.labels:
            write_labels(Path(args.labels) / f"{files.id}.{args.label_format}", labels)
        if figures:
            fig = draw(image, truth, labels, probs, title)
            if folder is not None:
                save_figure(fig, folder / f"{files.id}.png")
            if show:
                plt.show()
            plt.close(fig)
        return record

    records = each_of_share(world, samples, one_image, desc="predicting", leave=False)
    if not world.main:
        return None  # rank 0 merges the records and writes the tables and CSV files
    factors = {}
    for record in records:
        for name, factor in record["factors"].items():
            factors.setdefault(name, []).append(factor)
    for name, values in factors.items():
        print(f"size normalisation ({name}): images rescaled by {np.exp(np.mean(np.log(values))):.3f} on average "
              f"(geometric mean; {min(values):.3f} to {max(values):.3f})")
    for line in capped.report() if capped is not None else []:
        print(line)
    if args.tune:
        kept = [record["kept"] for record in records]
        grid = grid_for(heads, args.keep_policy)
        best, score = tune(kept, heads, post, args.keep_policy, workers=args.tune_workers)
        record = write_tuned(tuned_path(paths[0]), best, score, grid, dataset=args.dataset, n_images=len(kept),
                             checkpoints=[p.name for p in paths])
        print(f"Best mean DSB score {score:.4f} with " + ", ".join(f"{k} = {record[k]}" for k in grid)
              + f"; saved to {tuned_path(paths[0])}")
        return score
    scores = {r["id"]: r["score"] for r in records if "score" in r}
    extras = {r["id"]: r["extra"] for r in records if "score" in r}
    rows = [row for r in records for row in r["rows"]]
    dice_rows = [r["dice_row"] for r in records if "dice_row" in r]
    if scores:
        table = score_table(scores, extras)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        means = mean_scores(table)
        print("mean: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        named = [k for k in means if k in ("dsb", "dice", *EXTRA_COLUMNS)] if metric == "all" else [metric]
        print(f"score ({why}): " + ", ".join(f"mean {k} {means[k]:.4f}" for k in named))
        if args.scores:
            atomic_write_text(Path(args.scores), table.to_csv(index=False))
    if args.csv:
        write_submission(args.csv, rows)
        print(f"wrote {args.csv} ({len(rows)} rows, {len(samples)} images)")
    if args.dice_csv:
        write_dice_submission(args.dice_csv, dice_rows)
        print(f"wrote {args.dice_csv} ({len(dice_rows)} images, {args.dice_order}-major pixel numbering)")
    return mean_scores(table) if scores else None


if __name__ == "__main__":
    run_main(main)
