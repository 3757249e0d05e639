"""Benchmark of the post-processing policies on synthetic DSB2018-sized maps.

    python3 bench/postprocess_bench.py [--nuclei 100] [--repeat 3] [--seed 0]

Builds a 520x696 instance map of about 100 disk-like nuclei (about a third of them in touching
pairs or triples), turns it into target maps with dataset.targets.make_targets (default settings)
and feeds them, once as they are ('perfect') and once blurred and noisy ('soft', closer to a
network's output), to postprocess.py with 1, 2 and 3 heads. For each case it times the watershed,
the per-region random walker and the naive whole-image random walker on the same seeds and maps
(each including seeds and clean-up), and prints a markdown table with the time (best of --repeat;
the whole-image walker runs once), the number of objects, the mean IoU
of the truth objects with their best predicted match, and the pixel agreement of the two random
walkers on the foreground after matching labels.

A second table compares the two ways of seeding with a contour head (`[post] seed_peaks` off: the
seed core's connected components; on: its distance-transform peaks), watershed only, on the same
maps and on 'weak contour' maps: the soft maps with the contour head's map scaled by 0.3, so that
it mostly stays under threshold_edge, as the contour head of a network trained for 20 CPU-minutes
does (docs/results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import postprocess as pp  # noqa: E402
from config import load_config  # noqa: E402
from dataset.targets import make_targets  # noqa: E402

HEADS = {1: ("semantic",), 2: ("semantic", "contour"), 3: ("semantic", "contour", "marker")}


def synthetic_labels(shape, n_nuclei, rng) -> np.ndarray:
    """Disks (radius 6-14); about a third placed in touching clusters; overlaps go to the nearer
    centre, so clusters have straight contact lines."""
    centres, radii = [], []
    while len(centres) < n_nuclei:
        r = float(rng.uniform(6, 14))
        if centres and rng.random() < 0.35:  # touch a previous nucleus
            j = int(rng.integers(len(centres)))
            angle = rng.uniform(0, 2 * np.pi)
            dist = (r + radii[j]) * rng.uniform(0.75, 0.9)
            c = centres[j] + dist * np.array([np.sin(angle), np.cos(angle)])
        else:
            c = rng.uniform([r, r], [shape[0] - r, shape[1] - r])
        if not (r <= c[0] < shape[0] - r and r <= c[1] < shape[1] - r):
            continue
        # no deep overlaps with anything but the chosen neighbour
        if any(np.hypot(*(c - o)) < 0.7 * (r + ro) for o, ro in zip(centres, radii)):
            continue
        centres.append(c)
        radii.append(r)
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf)
    for i, (c, r) in enumerate(zip(centres, radii), start=1):
        y0, y1 = int(max(c[0] - r - 1, 0)), int(min(c[0] + r + 2, shape[0]))
        x0, x1 = int(max(c[1] - r - 1, 0)), int(min(c[1] + r + 2, shape[1]))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(yy - c[0], xx - c[1])
        win = (d <= r) & (d < best[y0:y1, x0:x1])
        labels[y0:y1, x0:x1][win] = i
        best[y0:y1, x0:x1][win] = d[win]
    # drop fragments (a disk almost covered by its neighbours) and renumber
    from skimage.segmentation import relabel_sequential
    sizes = np.bincount(labels.ravel())
    labels[(sizes < 30)[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)


def mean_best_iou(pred, truth) -> float:
    """Mean over truth objects of the IoU with the predicted object overlapping it most."""
    n_t, n_p = int(truth.max()), int(pred.max())
    both = truth.astype(np.int64) * (n_p + 1) + pred
    inter = np.bincount(both.ravel(), minlength=(n_t + 1) * (n_p + 1)).reshape(n_t + 1, n_p + 1)
    area_t, area_p = inter.sum(1), inter.sum(0)
    inter = inter[1:, 1:]
    if inter.size == 0:
        return 0.0
    union = area_t[1:, None] + area_p[None, 1:] - inter
    return float((inter / np.maximum(union, 1)).max(1).mean())


def agreement(a, b, fg) -> float:
    """Share of foreground pixels where a, with each label mapped to its most overlapping label
    of b, equals b."""
    n_a, n_b = int(a.max()), int(b.max())
    inter = np.bincount((a.astype(np.int64) * (n_b + 1) + b)[fg],
                        minlength=(n_a + 1) * (n_b + 1)).reshape(n_a + 1, n_b + 1)
    mapped = inter.argmax(1)
    return float((mapped[a][fg] == b[fg]).mean())


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def finish(labels, fg, n_seeds, settings):
    """The steps of postprocess() after the partition (missed blobs, small objects, holes)."""
    rest = fg & (labels == 0)
    if rest.any():
        extra, _ = ndimage.label(rest)
        labels = np.where(extra > 0, extra + n_seeds, labels)
    labels = pp.remove_small(labels, settings.min_object_size)
    labels = pp.fill_instance_holes(labels)
    return pp.relabel_sequential(labels.astype(np.int32))[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cfg = load_config(user_path=None)
    truth = synthetic_labels((520, 696), args.nuclei, rng)
    targets = make_targets(truth, cfg.contour, cfg.target)
    soft = {k: np.clip(ndimage.gaussian_filter(targets[k], 1.0)
                       + rng.normal(0, 0.05, truth.shape), 0, 1).astype(np.float32)
            for k in HEADS[3]}
    contact = (truth > 0) & ((ndimage.maximum_filter(truth, 3) != truth)
                             | (ndimage.minimum_filter(np.where(truth > 0, truth, 1 << 30), 3) != truth))
    n_touching = int(np.count_nonzero(np.bincount(truth[contact])[1:]))

    print(f"{truth.shape[0]}x{truth.shape[1]} map, {int(truth.max())} nuclei, {n_touching} touching "
          f"another; best of {args.repeat}; {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}\n")
    print("| maps | heads | seeds | multi-seed regions | watershed ms | rw per-region ms "
          "| rw whole-image ms | objects ws / rw / truth | mean IoU ws / rw | rw region vs whole |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    settings = load_config(user_path=None).post
    for maps_name, maps in (("perfect", targets), ("soft", soft)):
        for heads in (1, 2, 3):
            probs = {k: maps[k] for k in HEADS[heads]}
            seeds, n_seeds = pp.seeds(probs, settings)
            fg = pp.foreground(probs, settings, seeds)
            regions, n_regions = ndimage.label(fg)
            pairs = np.unique(np.stack([regions[seeds > 0], seeds[seeds > 0]]), axis=1)
            n_multi = int((np.bincount(pairs[0]) >= 2).sum())
            t_ws, ws = best_time(lambda: pp.postprocess(probs, settings), args.repeat)
            t_rw, rw = best_time(lambda: pp.postprocess(probs, load_config(user_path=None).replace("post", policy="rw").post),
                                 args.repeat)
            # the whole-image solve is slow (one system per seed over all the foreground): once
            t_whole, whole = best_time(lambda: finish(pp.random_walker_whole_image(
                probs, pp.seeds(probs, settings)[0], pp.foreground(probs, settings, seeds)),
                fg, n_seeds, settings), 1)
            print(f"| {maps_name} | {heads} | {n_seeds} | {n_multi} | {1e3 * t_ws:.0f} | "
                  f"{1e3 * t_rw:.0f} | {1e3 * t_whole:.0f} | {ws.max()} / {rw.max()} / "
                  f"{truth.max()} | {mean_best_iou(ws, truth):.3f} / {mean_best_iou(rw, truth):.3f}"
                  f" | {agreement(rw, whole, fg):.4f} |")

    weak = {**soft, "contour": (0.3 * soft["contour"]).astype(np.float32)}
    print("\n| maps | heads | seeds: components / peaks | objects: components / peaks / truth "
          "| mean IoU: components / peaks | watershed ms: components / peaks |")
    print("|---|---|---|---|---|---|")
    peaks = dataclasses.replace(settings, seed_peaks=True)
    for maps_name, maps in (("perfect", targets), ("soft", soft), ("weak contour", weak)):
        for heads in (2, 3):
            probs = {k: maps[k] for k in HEADS[heads]}
            n = [pp.seeds(probs, s)[1] for s in (settings, peaks)]
            timed = [best_time(lambda s=s: pp.postprocess(probs, s), args.repeat) for s in (settings, peaks)]
            (t_c, lab_c), (t_p, lab_p) = timed
            print(f"| {maps_name} | {heads} | {n[0]} / {n[1]} | {lab_c.max()} / {lab_p.max()} / {truth.max()} | "
                  f"{mean_best_iou(lab_c, truth):.3f} / {mean_best_iou(lab_p, truth):.3f} | "
                  f"{1e3 * t_c:.0f} / {1e3 * t_p:.0f} |")


if __name__ == "__main__":
    main()
