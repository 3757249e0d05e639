"""How well `dataset.sizes.estimate_diameter` finds an image's median nucleus diameter, on real masks.

    python3 bench/size_estimate.py                                  # stage1_train, blur 1.5 px
    python3 bench/size_estimate.py --scales 0.5 3 5 --every 4       # nuclei half, 3 and 5 times as large
    python3 bench/size_estimate.py --noise 0.15                     # a ragged, speckled map
    python3 bench/size_estimate.py --checkpoint ckpt.pkl --data DIR # a trained network's own maps
    python3 bench/size_estimate.py --checkpoint ckpt.pkl --data DIR --confidence 0  # faint pieces counted too

For every image of a DSB2018-layout folder (default ../shared/data/dsb2018/stage1_train) the true
median nucleus diameter is measured from its masks (`median_diameter`, the number training's
size normalisation uses). Without --checkpoint, a stand-in for a network's semantic map is made
from the same masks: the foreground, optionally rescaled by a factor (labels with nearest
neighbour), blurred with a Gaussian of --blur pixels and, with --noise, plus smooth random noise of
that standard deviation, then thresholded at 0.5 by the estimator. Touching nuclei stay touching,
so the estimator has to cut them apart itself. With --checkpoint, the image itself is rescaled
(area averaging when it shrinks, bilinear when it grows) and the estimate comes from the
network's semantic map as prediction makes it (`inference.estimate_scale`): after the first pass
(the image's own scale and its coarser views, of which the rule picks one), and after all the
passes. Prints, per scale, the ratio estimate /
truth: its median, the share of images within 10 % and 20 %, its 5th and 95th percentiles and
the worst image, and the seconds per image. Torch is imported only for --checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accuracy import rescale_sample  # noqa: E402
from dataset.io import list_samples, read_sample_cached  # noqa: E402
from dataset import sizes  # noqa: E402
from dataset.sizes import estimate_diameter, median_diameter  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dsb2018" / "stage1_train"


def stand_in_map(labels: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A semantic probability map like a network's, from instance labels."""
    semantic = (labels > 0).astype(np.float32)
    if blur > 0:
        semantic = cv2.GaussianBlur(semantic, (0, 0), blur)
    if noise > 0:
        field = cv2.GaussianBlur(rng.standard_normal(labels.shape).astype(np.float32), (0, 0), 1.5)
        semantic += noise * field / max(float(field.std()), 1e-6)
    return np.clip(semantic, 0, 1)


def network(checkpoint: str):
    """A function image -> (first-pass estimate, all-passes estimate), from a checkpoint."""
    import torch
    from config import load_config, under_saved
    from inference import Member, estimate_scale, member_input, prediction_diameter
    from model.checkpoint import load_model

    torch.set_grad_enabled(False)
    model, state = load_model(checkpoint)
    cfg, _ = under_saved(load_config(user_path=None), state.get("config") or {}, checkpoint)
    member = Member(model.eval(), cfg.pre, Path(checkpoint).name)

    def estimates(image: np.ndarray) -> tuple[float | None, float | None]:
        x = member_input(member, image)
        target = prediction_diameter(cfg.pre, cfg.valid)
        first = estimate_scale(model, x, cfg.valid, cfg.pre.width, target, passes=1)[0]
        return first, estimate_scale(model, x, cfg.valid, cfg.pre.width, target)[0]
    return estimates


def summary(label: str, found: list[tuple[str, float, float | None]], seconds: float) -> str:
    """One line on (id, truth, estimate) triples; a missing estimate counts as ratio 0."""
    r = np.array([(e or 0.0) / t for _, t, e in found])
    log_err = np.abs(np.log(np.maximum(r, 1e-3)))
    worst = int(np.argmax(log_err))
    return (f"{label}: {len(r)} images; estimate / truth: median {np.median(r):.3f}, "
            f"within 10 % {np.mean(log_err <= np.log(1.1)):.3f}, within 20 % {np.mean(log_err <= np.log(1.2)):.3f}, "
            f"5th-95th percentile {np.percentile(r, 5):.3f}-{np.percentile(r, 95):.3f}, worst {r[worst]:.3f} "
            f"({found[worst][0][:12]}, true diameter {found[worst][1]:.1f}); {seconds / len(r):.3f} s per image")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="DSB2018-layout folder")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="rescale factors of the masks")
    parser.add_argument("--blur", type=float, default=1.5, help="Gaussian sigma of the stand-in map, pixels")
    parser.add_argument("--noise", type=float, default=0.0, help="standard deviation of the map's noise")
    parser.add_argument("--checkpoint", help="estimate from this trained network's maps instead")
    parser.add_argument("--every", type=int, default=1, help="use every n-th image (sorted by id)")
    parser.add_argument("--max-pixels", type=float, default=16e6,
                        help="skip an image whose rescaled copy has more pixels than this")
    parser.add_argument("--cache", default="out/bench/cache", help="decoded-sample cache folder")
    parser.add_argument("--confidence", type=float, help="pieces of a lower mean probability are not counted "
                        f"(dataset.sizes.MIN_CONFIDENCE, default {sizes.MIN_CONFIDENCE})")
    args = parser.parse_args(argv)
    if args.confidence is not None:
        sizes.MIN_CONFIDENCE = args.confidence

    samples = [s for s in list_samples(args.data) if s.mask_paths is not None][::args.every]
    estimates = network(args.checkpoint) if args.checkpoint else None
    lines = []
    for factor in args.scales:
        rng = np.random.default_rng(0)
        found, first, seconds = [], [], 0.0
        for files in samples:
            image, labels = read_sample_cached(files, True, args.cache)
            if labels.size * factor ** 2 > args.max_pixels:
                continue
            if factor != 1:  # bench/accuracy.py's rescale, masks by nearest neighbour as in the docs' rows
                image, labels = rescale_sample(image, labels, factor, "nearest")
            truth = median_diameter(labels)
            if truth is None:
                continue
            start = time.perf_counter()
            if estimates is None:
                found.append((files.id, truth, estimate_diameter(stand_in_map(labels, args.blur, args.noise, rng))))
            else:
                one, every = estimates(image)
                first.append((files.id, truth, one))
                found.append((files.id, truth, every))
            seconds += time.perf_counter() - start
        if estimates is None:
            lines.append(summary(f"scale {factor:g}, blur {args.blur:g}, noise {args.noise:g}", found, seconds))
        else:
            lines.append(summary(f"scale {factor:g}, {Path(args.checkpoint).name}, first pass", first, seconds))
            lines.append(summary(f"scale {factor:g}, {Path(args.checkpoint).name}, all passes", found, seconds))
        print("\n".join(lines[-2 if estimates else -1:]), flush=True)
    return lines


if __name__ == "__main__":
    main()
