"""How far apart nuclei and background are in each grey view of the colour images, per family.

    python3 bench/view_contrast.py [DATA] [--families colour_white colour_tinted]

For every colour image of the named families (`dataset/families.py`), each view that `[pre]
stain_norm` offers (the haematoxylin concentration, the inverted luminance) and a few plain ones
(each channel inverted, the inverted mean of the channels) is computed by the same functions
training and prediction use where there are any, and the nuclei's pixels (the union of the masks)
are set against the rest by Cohen's d: the difference of the two means over their pooled standard
deviation. A larger d is a view in which a threshold separates nuclei from background better. The
script prints, per family and view, the median d over the images and its 10th percentile. Pixels
only: it says nothing of how well touching nuclei can be told apart. It also counts the images
whose inverted-luminance view has a median at or above the brightfield threshold
(`dataset.families.BRIGHT_MEDIAN`): those that `[pre] invert_bright` inverted back to dark nuclei
before it was limited to images grey as they come (docs/results.md, session 14).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset.augment import haematoxylin_view, inverted_grey_view  # noqa: E402
from dataset.families import BRIGHT_MEDIAN, is_colour, sample_families  # noqa: E402
from dataset.io import list_samples, read_sample  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dsb2018" / "stage1_train"

VIEWS = {
    "stain_norm = hematoxylin": lambda image: haematoxylin_view(image)[..., 0],
    "stain_norm = inverted_grey": lambda image: inverted_grey_view(image)[..., 0],
    "inverted mean of R, G, B": lambda image: 255.0 - image.mean(axis=2),
    "inverted R": lambda image: 255.0 - image[..., 0],
    "inverted G": lambda image: 255.0 - image[..., 1],
    "inverted B": lambda image: 255.0 - image[..., 2],
}


def cohens_d(values: np.ndarray, inside: np.ndarray) -> float:
    """(mean inside - mean outside) / the pooled standard deviation of the two."""
    a, b = values[inside].astype(np.float64), values[~inside].astype(np.float64)
    return float((a.mean() - b.mean()) / max(np.sqrt(0.5 * (a.var() + b.var())), 1e-9))


def main(argv=None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="DSB2018-layout folder with masks")
    parser.add_argument("--families", nargs="+", default=["colour_white", "colour_tinted"])
    args = parser.parse_args(argv)
    samples = [s for s in list_samples(args.data) if s.mask_paths is not None]
    families = sample_families(samples)
    out: dict[str, dict[str, list[float]]] = {}
    for family in args.families:
        chosen = [s for s in samples if families[s.id] == family]
        if not chosen:
            raise SystemExit(f"error: no image of family {family} in {args.data} "
                             f"(families: {', '.join(sorted(set(families.values())))})")
        scores: dict[str, list[float]] = {view: [] for view in VIEWS}
        bright_views = 0
        for sample in chosen:
            image, labels = read_sample(sample)
            if not is_colour(image) or not (labels > 0).any() or (labels > 0).all():
                continue
            for view, make in VIEWS.items():
                scores[view].append(cohens_d(make(image), labels > 0))
            bright_views += bool(np.median(inverted_grey_view(image).mean(axis=2)) >= BRIGHT_MEDIAN)
        counted = len(scores[next(iter(VIEWS))])
        if not counted:
            raise SystemExit(f"error: family {family} of {args.data} has no colour image with both nuclei and "
                             f"background to compare")
        out[family] = scores
        print(f"{family} ({counted} colour images): Cohen's d, median (10th percentile)")
        for view, values in scores.items():
            print(f"  {view:28s} {np.median(values):.2f} ({np.percentile(values, 10):.2f})")
        print(f"  inverted_grey views with a median of {BRIGHT_MEDIAN:g} or more: {bright_views} of {counted}")
    return out


if __name__ == "__main__":
    main()
