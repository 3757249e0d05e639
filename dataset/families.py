"""Image families: a fixed rule that groups images by how they look, for the leave-one-family-out
benchmark (`bench/accuracy.py --hold-out-family`) and for balanced sampling (`[train] balance_family`).

    python3 -m dataset.families ../shared/data/dsb2018/stage1_train   # the family of every image, counted

The rule reads the image alone (never its masks), in this order:

1. colour or grey: an image is grey when its channels differ by less than 2 grey levels on average
   (`COLOUR_CHROMA`); otherwise it is colour (stained tissue or cells).
2. a colour image is `colour_tinted` when its median colour (the per-channel median, mostly the
   background) is itself coloured, its largest and smallest channel more than `TINT_CHROMA` (32)
   levels apart (tissue sections on a lilac or pink background), else `colour_white` (stained cells
   on a white background).
3. a grey image whose median is `BRIGHT_MEDIAN` (100) or more is `brightfield` (dark nuclei on a
   bright background); a darker one is fluorescence (bright nuclei on a dark background).
4. fluorescence images are split by size: `fluorescence_small` under `MEDIUM_AREA` (100 000) pixels
   (DSB2018's 256x256 tiles), `fluorescence_large` from `LARGE_AREA` (250 000) pixels (520x696 and
   larger microscope frames), `fluorescence_medium` between (the 360x360 images of large, dim nuclei).

On DSB2018 stage1_train (664 images) this gives fluorescence_small 341, fluorescence_medium 90,
fluorescence_large 110, brightfield 16, colour_tinted 69, colour_white 38 (run the command above to
see them). A family of fewer than `min_size` images in a folder (10 by default) is merged into
the family whose mean features (`FEATURES`, standardised over the folder) are nearest, the
smallest family first, so a folder of other images never makes a validation family of a handful.
Everything here is deterministic and imports no torch.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable

import numpy as np

from dataset.io import SampleFiles, list_samples, read_image

COLOUR_CHROMA = 2.0      # mean |max - min| over the channels below which an image is grey
TINT_CHROMA = 32.0       # chroma of the median colour above which a colour background is tinted
BRIGHT_MEDIAN = 100.0    # median grey level from which a grey image is brightfield
MEDIUM_AREA = 100_000    # pixels: fluorescence_small below, fluorescence_medium from here
LARGE_AREA = 250_000     # pixels: fluorescence_large from here
FAMILIES = ("fluorescence_small", "fluorescence_medium", "fluorescence_large", "brightfield",
            "colour_tinted", "colour_white")
# the per-image numbers the merge of small families compares (see image_features)
FEATURES = ("colour", "chroma", "tint", "median", "log_area")


def chroma(image: np.ndarray) -> float:
    """Mean over the pixels of an RGB uint8 image of its largest minus its smallest channel."""
    return float((image.max(axis=2).astype(np.int16) - image.min(axis=2)).mean())


def is_colour(image: np.ndarray) -> bool:
    """The rule's colour test: channels at least COLOUR_CHROMA grey levels apart on average."""
    return chroma(image) >= COLOUR_CHROMA


def image_features(image: np.ndarray) -> dict[str, float]:
    """Simple numbers of an RGB uint8 (H, W, 3) image: `chroma` (mean over pixels of the largest minus
    the smallest channel), `colour` (1.0 when chroma reaches COLOUR_CHROMA), `tint` (largest minus
    smallest channel of the per-channel median colour), `median` (median of the channel mean),
    `area` (pixels) and `log_area`."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    spread = chroma(image)
    median_colour = np.median(image.reshape(-1, 3), axis=0)
    area = image.shape[0] * image.shape[1]
    return {"colour": float(spread >= COLOUR_CHROMA), "chroma": spread,
            "tint": float(median_colour.max() - median_colour.min()),
            "median": float(np.median(image.mean(axis=2))), "area": float(area),
            "log_area": float(np.log(area))}


def family_of(features: dict[str, float]) -> str:
    """The family name the rule (module docstring) gives to an image's `image_features`."""
    if features["colour"]:
        return "colour_tinted" if features["tint"] > TINT_CHROMA else "colour_white"
    if features["median"] >= BRIGHT_MEDIAN:
        return "brightfield"
    if features["area"] < MEDIUM_AREA:
        return "fluorescence_small"
    return "fluorescence_medium" if features["area"] < LARGE_AREA else "fluorescence_large"


def image_family(image: np.ndarray) -> str:
    """The family of one RGB uint8 image, by the rule alone (no merging)."""
    return family_of(image_features(image))


def merge_small(names: dict[str, str], features: dict[str, dict[str, float]], min_size: int) -> dict[str, str]:
    """{id: family} with every family of fewer than `min_size` ids merged into the nearest other family.

    Families are visited smallest first (ties by name); each small one joins the family whose mean
    `FEATURES` vector, standardised over all ids, is nearest to its own (Euclidean; ties by name).
    Stops when every family is large enough or one family is left.
    """
    ids = sorted(names)
    if not ids:
        return {}
    matrix = np.array([[features[i][k] for k in FEATURES] for i in ids], dtype=np.float64)
    spread = matrix.std(axis=0)
    matrix = (matrix - matrix.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    row = {i: n for n, i in enumerate(ids)}
    result = dict(names)
    while True:
        counts = Counter(result.values())
        if len(counts) < 2:
            return result
        small = sorted((c, name) for name, c in counts.items() if c < min_size)
        if not small:
            return result
        name = small[0][1]

        def centre(family: str) -> np.ndarray:
            return matrix[[row[i] for i in ids if result[i] == family]].mean(axis=0)

        mine = centre(name)
        target = min((float(np.linalg.norm(centre(other) - mine)), other) for other in counts if other != name)[1]
        result = {i: (target if f == name else f) for i, f in result.items()}


def sample_families(samples: Iterable[SampleFiles], min_size: int = 10,
                    features: dict[str, dict[str, float]] | None = None) -> dict[str, str]:
    """{sample id: family} for the samples of one folder: the rule, then `merge_small`.
    `features` may give precomputed `image_features` by id; missing ones are read from the images."""
    samples = list(samples)
    features = dict(features or {})
    for sample in samples:
        if sample.id not in features:
            features[sample.id] = image_features(_read(sample))
    ids = [s.id for s in samples]
    names = {i: family_of(features[i]) for i in ids}
    return merge_small(names, {i: features[i] for i in ids}, min_size)


def family_weights(families: dict[str, str], ids: list[str]) -> np.ndarray:
    """Sampling weights (float64, one per id, in order) that draw every family equally often: each
    id weighs 1 / the number of `ids` in its family."""
    counts = Counter(families[i] for i in ids)
    return np.array([1.0 / counts[families[i]] for i in ids], dtype=np.float64)


def _read(sample: SampleFiles) -> np.ndarray:
    percentiles = getattr(sample, "percentiles", None)  # other layouts normalise each image
    return read_image(sample.image_path) if percentiles is None else read_image(sample.image_path, percentiles)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Count the image families of a DSB2018-layout folder.")
    parser.add_argument("folder")
    parser.add_argument("--min-size", type=int, default=10, help="merge families smaller than this")
    parser.add_argument("--list", action="store_true", help="also print every image id and its family")
    args = parser.parse_args(argv)
    samples = list_samples(args.folder)
    families = sample_families(samples, args.min_size)
    if args.list:
        for sample_id, family in sorted(families.items()):
            print(sample_id, family)
    for family, count in sorted(Counter(families.values()).items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{family:22s} {count}")
    return families


if __name__ == "__main__":
    from config import run_main
    sys.exit(0 if run_main(main) is not None else 1)
