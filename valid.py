"""Predict, score and export: checkpoint ensembles, TTA, instances, DSB scores, figures, RLE CSV.

    python3 valid.py --dataset valid --save            # figures + per-image scores + mean
    python3 valid.py ckptA.pkl ckptB.pkl --csv         # ensemble two checkpoints, write a submission
    python3 valid.py --dataset valid --tune            # grid-search [post] thresholds, save them
    %matplotlib inline; %run valid.py --show           # figures in a notebook

With no checkpoint, the one named by [train] checkpoint_dir/current.json is used. Images come from
[dataset] root/<dataset>; `--dataset valid` without a valid/ folder uses the held-out split that
train.py uses. Thresholds tuned with --tune are saved next to the first checkpoint
(<checkpoint>.post.json) and used from then on unless --no-tuned is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atomic import atomic_path
from config import Config, InputError, PostConfig, load_and_report, run_main
from dataset import training_split
from dataset.augment import prepare_image, to_tensor_image
from dataset.io import list_samples, read_sample_cached
from inference import predict_image
from metrics import match, mean_scores, score_table
from model.checkpoint import latest_checkpoint, load_model
from postprocess import postprocess
from rle import labels_to_rows, write_submission

TUNE_GRID = {"threshold": (0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "threshold_edge": (0.3, 0.5, 0.7),
             "threshold_mark": (0.3, 0.5, 0.7), "policy": ("ws", "rw")}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files (default: the latest)")
    parser.add_argument("--dataset", default="test", help="train, valid or test: a folder under [dataset] root")
    parser.add_argument("--csv", nargs="?", const="submission.csv", help="write a run-length encoded submission")
    parser.add_argument("--save", nargs="?", const="out/figures", help="write side-by-side figures to DIR")
    parser.add_argument("--show", action="store_true", help="show the figures (inline in a notebook)")
    parser.add_argument("--masks", metavar="DIR", help="write predicted instances as DSB-layout mask PNGs")
    parser.add_argument("--labels", metavar="DIR", help="write one label TIFF (uint16/int32) per image")
    parser.add_argument("--scores", metavar="PATH", help="write the per-image score table as CSV")
    parser.add_argument("--tune", action="store_true", help="grid-search [post] on this labelled set and save it")
    parser.add_argument("--keep-policy", action="store_true", help="--tune only the thresholds, keep [post] policy")
    parser.add_argument("--no-tuned", dest="tuned", action="store_false", help="ignore saved tuned thresholds")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    return parser.parse_args(argv)


def dataset_samples(cfg: Config, name: str):
    folder = Path(cfg.dataset.root) / name
    if name == "valid" and not folder.is_dir():
        return training_split(cfg)[1]
    return list_samples(folder)


def tuned_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".post.json")


def load_post(cfg: Config, checkpoint: Path, use_tuned: bool) -> PostConfig:
    path = tuned_path(checkpoint)
    if not (use_tuned and path.is_file()):
        return cfg.post
    try:
        values = json.loads(path.read_text())
        post = dataclasses.replace(cfg.post, **{k: values[k] for k in TUNE_GRID})
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a tuned-thresholds file ({exc})") from None
    print(f"Using tuned post-processing from {path}: " + ", ".join(f"{k} = {values[k]}" for k in TUNE_GRID))
    return post


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tune(items: list, heads: set[str], base: PostConfig, keep_policy: bool = False) -> tuple[PostConfig, float]:
    """Best mean DSB score over the grid; items are (probs, truth) pairs. Thresholds of heads the
    models lack are not searched; with keep_policy neither is the policy."""
    grid = {k: v for k, v in TUNE_GRID.items()
            if (k != "threshold_edge" or "contour" in heads) and (k != "threshold_mark" or "marker" in heads)
            and (k != "policy" or not keep_policy)}
    best, best_score = base, -1.0
    combos = list(itertools.product(*grid.values()))
    for values in tqdm(combos, desc="tuning", leave=False):
        post = dataclasses.replace(base, **dict(zip(grid, values)))
        score = float(np.mean([match(truth, postprocess(probs, post)).dsb for probs, truth in items]))
        if score > best_score:
            best, best_score = post, score
    return best, best_score


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
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{sample_id}."))
    (tmp / "images").mkdir()
    (tmp / "masks").mkdir()
    cv2.imwrite(str(tmp / "images" / f"{sample_id}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    for n in range(1, int(labels.max()) + 1):
        cv2.imwrite(str(tmp / "masks" / f"{n:04d}.png"), (labels == n).astype(np.uint8) * 255)
    target = folder / sample_id
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_label_tiff(folder: Path, sample_id: str, labels: np.ndarray) -> None:
    import tifffile
    dtype = np.uint16 if labels.max() < 2 ** 16 else np.int32
    with atomic_path(folder / f"{sample_id}.tif", ".tif") as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype))


def main(argv=None):
    args = parse_args(argv)
    cfg = load_and_report(args.config)
    paths = [Path(p) for p in args.checkpoints] or [latest_checkpoint(cfg.train.checkpoint_dir)]
    if paths[0] is None:
        raise InputError(f"{cfg.train.checkpoint_dir}: no current.json; name a checkpoint or train first")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_model(p, device)[0].eval() for p in paths]
    heads = set().union(*(m.heads for m in models))
    post = load_post(cfg, paths[0], args.tuned and not args.tune)
    samples = dataset_samples(cfg, args.dataset)
    print(f"{len(models)} checkpoint(s) ({', '.join(p.name for p in paths)}) on {len(samples)} "
          f"{args.dataset} images, {device}, TTA {'on' if cfg.valid.test_time_augment else 'off'}, policy {post.policy}")

    if args.show or args.save:
        import matplotlib
        if not args.show:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    rows, scores, kept = [], {}, []
    for files in tqdm(samples, desc="predicting", leave=False):
        image, truth = read_sample_cached(files, cfg.target.fill_holes, cfg.dataset.cache_dir)
        probs = predict_image(models, to_tensor_image(prepare_image(image, cfg.pre)), cfg.valid, cfg.pre.width,
                              device)
        if args.tune:
            if truth is None:
                raise InputError(f"{files.folder}: --tune needs labelled images (masks/)")
            kept.append((probs, truth))
            continue
        labels = postprocess(probs, post)
        title = f"{files.id[:16]}: {int(labels.max())} nuclei"
        if truth is not None:
            scores[files.id] = match(truth, labels)
            title += f", DSB score {scores[files.id].dsb:.3f}"
        rows += labels_to_rows(files.id, labels)
        if args.masks:
            write_masks(Path(args.masks), files.id, image, labels)
        if args.labels:
            write_label_tiff(Path(args.labels), files.id, labels)
        if args.show or args.save:
            fig = draw(image, truth, labels, probs, title)
            if args.save:
                save_figure(fig, Path(args.save) / f"{files.id}.png")
            if args.show:
                plt.show()
            plt.close(fig)

    if args.tune:
        best, score = tune(kept, heads, cfg.post, args.keep_policy)
        values = {k: getattr(best, k) for k in TUNE_GRID}
        atomic_write_text(tuned_path(paths[0]), json.dumps({**values, "mean_dsb": score,
                                                            "dataset": args.dataset, "n_images": len(kept)}, indent=1))
        print(f"Best mean DSB score {score:.4f} with " + ", ".join(f"{k} = {v}" for k, v in values.items())
              + f"; saved to {tuned_path(paths[0])}")
        return score
    if scores:
        table = score_table(scores)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        means = mean_scores(scores)
        print("mean: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if args.scores:
            atomic_write_text(Path(args.scores), table.to_csv(index=False))
    if args.csv:
        write_submission(args.csv, rows)
        print(f"wrote {args.csv} ({len(rows)} rows, {len(samples)} images)")
    return mean_scores(scores) if scores else None


if __name__ == "__main__":
    run_main(main)
