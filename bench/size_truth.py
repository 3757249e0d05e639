"""How much of a size test set's gap is the rescaled truth itself, and how much the network's.

    python3 bench/size_truth.py out/bench_s0/v5_size_norm_f32_s0 --factor 0.5

`bench/accuracy.py --scales 0.5` scores a network on its validation split made half as large. At
that size a DSB2018 nucleus is 8 or 9 pixels across, and if the masks are made small by nearest
neighbour (`--shrink-truth nearest`, the set of rows before session 15), which of its boundary
pixels survive depends on where the sampling grid falls. This script asks what a network that
were perfectly size-invariant would score there: its own predictions on the full-size images, made
small. It needs a finished accuracy.py run folder (`checkpoint/`, `settings.ini`, `data/valid` and
`data/valid_x<FACTOR>`), writes the run's label images at both sizes once under
`<run>/size_truth/` (valid.py --labels; about the time of scoring both sets), and prints the mean
DSB score of

- the network on the rescaled images (what the benchmark's `dsb_x<FACTOR>` column reports, against
  the truth the set was made with),
- its full-size labels made small by nearest neighbour, and
- its full-size labels made small one nucleus at a time by area averaging, kept where at least half
  of a pixel is covered (a smooth rescale, as `--shrink-truth smooth` makes the set's masks),

each against the full-size truth made small both ways (whichever way the set itself was made), and
the two truths against each other. Where the full-size labels made small score as low as the
rescaled prediction, the gap is the test set's resampling, not a lack of size invariance.

With --true-scale (a checkpoint trained with `[pre] size_norm`), the rescaled images are also
predicted at the factor their true masks give (`dataset.sizes.median_diameter`) instead of the
network's own estimate (`inference.predict_normalised` with that factor), with the same tuned
[post]: what a perfect size estimate would add.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accuracy import nearest_labels, smooth_labels  # noqa: E402
from dataset.io import list_samples, read_sample  # noqa: E402
from metrics import match  # noqa: E402


def run_checkpoint(run: Path) -> Path:
    """The checkpoint a bench/accuracy.py row scored: the last one it trained, or the one a
    `--from-run` row linked into its folder (with its tuned [post] beside it)."""
    from model.checkpoint import latest_checkpoint
    folder = run / "checkpoint"
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        linked = sorted(folder.glob("*.pkl")) if folder.is_dir() else []
        if len(linked) != 1:
            raise SystemExit(f"error: {folder}: no checkpoint, or an ensemble of {len(linked)}; "
                             "run bench/accuracy.py first, with one --from-run at most")
        checkpoint = linked[0]
    return checkpoint


def write_labels(run: Path, dataset: str, folder: Path) -> None:
    """The run's checkpoint's label images for `dataset`, written once by valid.py (tuned [post])."""
    if folder.is_dir():
        return
    import valid
    checkpoint = run_checkpoint(run)
    valid.main([str(checkpoint), "--dataset", dataset, "--labels", str(folder), "--label-format", "png",
                "--no-figures", "--config", str(run / "settings.ini")])


def true_scale_scores(run: Path, name: str) -> tuple[float, float]:
    """(mean DSB of the images of data/<name> predicted at the factor their true masks give, share of
    images whose estimated factor is within 20 % of that one), with the run's tuned [post]."""
    import torch
    from config import load_config
    from dataset.sizes import median_diameter, size_factor
    from inference import estimate_scale, member_input, predict_normalised, prediction_diameter
    from postprocess import postprocess
    from tuning import resolve_post
    from valid import load_members
    checkpoint = run_checkpoint(run)
    members, cfg = load_members([checkpoint], load_config(run / "settings.ini"), torch.device("cpu"), False)
    member = members[0]
    post, _ = resolve_post(cfg, checkpoint, True)
    target = prediction_diameter(member.pre, cfg.valid)
    scores, within = [], []
    with torch.no_grad():
        for files in list_samples(run / "data" / name):
            image, truth = read_sample(files)
            x = member_input(member, image)
            true = size_factor(median_diameter(truth), target)
            _, estimated = estimate_scale(member.model, x, cfg.valid, member.pre.width, target)
            within.append(abs(np.log(estimated / true)) < np.log(1.2))
            maps, _, _ = predict_normalised(member.model, x, cfg.valid, member.pre.width, target, factor=true)
            scores.append(match(truth, postprocess({k: v.numpy() for k, v in maps.items()}, post)).dsb)
    return float(np.mean(scores)), float(np.mean(within))


def read_labels(path: Path) -> np.ndarray:
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise SystemExit(f"error: {path}: missing or unreadable label image")
    return labels.astype(np.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a bench/accuracy.py run folder scored with --scales FACTOR")
    parser.add_argument("--factor", type=float, default=0.5, help="the size test set to read (default 0.5)")
    parser.add_argument("--true-scale", action="store_true",
                        help="also predict the rescaled images at the scale their true masks give")
    args = parser.parse_args(argv)
    run = Path(args.run)
    name = f"valid_x{args.factor:g}"
    for need in (run / "settings.ini", run / "data" / "valid", run / "data" / name):
        if not need.exists():
            raise SystemExit(f"error: {need}: not found; run bench/accuracy.py --scales {args.factor:g} first")
    if args.true_scale:
        from config import load_config
        if not load_config(run / "settings.ini", user_path=None).pre.size_norm:
            raise SystemExit(f"error: {run / 'settings.ini'}: --true-scale needs a run trained with [pre] size_norm")
    out = run / "size_truth"
    write_labels(run, "valid", out / "valid")
    write_labels(run, name, out / name)

    made = "smooth" if (run / "data" / name).resolve().name.endswith("-smooth") else "nearest"
    small = {s.id: s for s in list_samples(run / "data" / name)}
    rows = []
    for files in list_samples(run / "data" / "valid"):
        _, truth = read_sample(files)
        shape = read_sample(small[files.id])[1].shape
        truths = (nearest_labels(truth, shape), smooth_labels(truth, shape))
        native = read_labels(out / name / f"{files.id}.png")
        full = read_labels(out / "valid" / f"{files.id}.png")
        preds = (native, nearest_labels(full, shape), smooth_labels(full, shape))
        rows.append([match(truth, full).dsb, match(*truths).dsb]
                    + [match(t, pred).dsb for pred in preds for t in truths])
    r = np.mean(rows, axis=0)
    print(f"{run} ({len(rows)} images), size test set x{args.factor:g}, its masks made small: {made}")
    print(f"full-size prediction against full-size truth: {r[0]:.3f}")
    print(f"smooth truth against the nearest-neighbour truth: {r[1]:.3f}")
    print("| prediction | against the nearest-neighbour truth | against the smooth truth |")
    print("| --- | ---: | ---: |")
    labels = (f"network on the x{args.factor:g} images", "full-size prediction made small, nearest neighbour",
              "full-size prediction made small, smooth")
    for i, label in enumerate(labels):
        print(f"| {label} | {r[2 + 2 * i]:.3f} | {r[3 + 2 * i]:.3f} |")
    if args.true_scale:
        true, within = true_scale_scores(run, name)
        own = r[2] if made == "nearest" else r[3]  # scored against the set's own truth, as `true` is
        print(f"x{args.factor:g} images at the network's estimated scale: {own:.3f}, at the true masks' "
              f"scale: {true:.3f} (estimate within 20 % of the true factor on {within:.0%} of the images)")


if __name__ == "__main__":
    main()
