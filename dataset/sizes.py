"""Nucleus sizes for `[pre] size_norm`: the median nucleus diameter of an image, measured exactly from
instance labels (training) or estimated from a semantic probability map (prediction), and the
factor that brings it to `[pre] nucleus_diameter`.

A nucleus's diameter is its equivalent diameter, 2 * sqrt(area / pi): the diameter of the disk with
its area. numpy/SciPy/scikit-image/OpenCV only, no torch.

    factor = size_factor(median_diameter(labels), pre.nucleus_diameter)        # training
    factor = size_factor(estimate_diameter(probs["semantic"]), pre.nucleus_diameter)  # prediction

The estimate needs no instances from the network (which splits nuclei into pieces when they are
far from the size it was trained on): the foreground (semantic > 0.5) is cut into nuclei at the
necks of its distance transform, and a neck cuts only where the distance falls below
`NECK_RATIO` of the lower of the two peaks it separates. The rule is relative, so a nucleus five
times the usual size is cut exactly like a usual one, and two touching round nuclei are two. The
median of the pieces' equivalent diameters, specks and faint pieces left out, is the estimate.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage
from skimage.morphology import reconstruction
from skimage.segmentation import watershed

# the rescale factor size normalisation may apply: nuclei under 5 pixels across (20 / 4) are
# enlarged at most 4 times (16 times the pixels to predict), nuclei over 160 shrunk at most 8 times
FACTOR_MIN = 0.125
FACTOR_MAX = 4.0
# a neck of the foreground's distance transform below this share of the lower peak it separates
# cuts two nuclei apart (two touching disks of radius r whose neck is narrower than 1.5 r)
NECK_RATIO = 0.75
# distance-transform offset (pixels) that keeps the relative rule from cutting small nuclei at
# one-pixel bumps: peaks of 3 pixels are cut apart by a neck of 1.75 pixels or less, not 2.25
NECK_OFFSET = 2.0
# pieces smaller than this equivalent diameter (pixels) are specks, not nuclei, and not counted
MIN_DIAMETER = 3.5
# nor are pieces under this share of the area-weighted median diameter (that of the piece holding
# the median foreground pixel): noise leaves many specks along the edges of large nuclei, but
# they hold little of the area. A real nucleus this much smaller than most is rare
# (bench/size_estimate.py and docs/results.md measured the estimate with this rule).
SPECK_RATIO = 0.15
# semantic probability above which a pixel is nucleus, for the estimate
THRESHOLD = 0.5
# pieces whose mean probability is below this are not counted either, when any piece reaches it:
# a network shown an image type it never saw can answer its background texture with many faint
# nucleus-sized pieces, which outnumber the few sure nuclei and pulled the estimate to a fraction
# of the truth; prediction then enlarged the image fourfold and found hundreds of "nuclei" in the
# texture (docs/results.md, "The size estimate on an unseen stain": bench/size_estimate.py)
MIN_CONFIDENCE = 0.75


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """float64 (n,): 2 * sqrt(area / pi) of every instance present in an int label map (0 is background)."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / math.pi)


def median_diameter(labels: np.ndarray) -> float | None:
    """The median equivalent diameter of the instances of a label map, or None when it has none."""
    diameters = equivalent_diameters(labels)
    return float(np.median(diameters)) if diameters.size else None


def size_factor(diameter: float | None, target: float) -> float:
    """The rescale factor target / diameter, clamped to FACTOR_MIN..FACTOR_MAX; 1 when there is no
    diameter (an image without nuclei is left as it is)."""
    if diameter is None or not diameter > 0:
        return 1.0
    return float(min(max(target / diameter, FACTOR_MIN), FACTOR_MAX))


def _distance(mask: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def split_foreground(mask: np.ndarray) -> np.ndarray:
    """int32 (H, W) pieces of a bool foreground, cut at the necks of its distance transform.

    Seeds are the domes of log(distance + NECK_OFFSET) that rise at least -log(NECK_RATIO) above
    the saddle to any higher dome (h-maxima on a log scale: a ratio of distances, not a number of
    pixels); a watershed of the distance transform grows them over the foreground.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    dist = ndimage.gaussian_filter(_distance(mask), 1.0) * mask
    floor = math.log(NECK_OFFSET) - 1.0  # background: below every foreground value
    height = np.where(mask, np.log(dist + NECK_OFFSET), floor)
    h = -math.log(NECK_RATIO)
    residue = height - reconstruction(height - h, height, method="dilation")
    tops, n = ndimage.label(residue > 1e-6, structure=np.ones((3, 3), bool))
    if n == 0:
        return ndimage.label(mask)[0].astype(np.int32)
    rise = np.zeros(n + 1)
    np.maximum.at(rise, tops.ravel(), residue.ravel())
    keep = rise >= h - 1e-6
    keep[0] = False
    seeds = np.where(keep[tops], tops, 0)
    return watershed(-dist, seeds, mask=mask).astype(np.int32)


def estimate_diameter(semantic: np.ndarray, threshold: float = THRESHOLD,
                      confidence: float | None = None) -> float | None:
    """Estimated median nucleus diameter (pixels) of a semantic probability map (H, W) in [0, 1],
    or None when it shows no nucleus (no piece of MIN_DIAMETER or more). Pieces whose mean
    probability is under `confidence` (default MIN_CONFIDENCE) are left out unless none reaches it."""
    semantic = np.asarray(semantic)
    pieces = split_foreground(semantic > threshold)
    confidence = MIN_CONFIDENCE if confidence is None else confidence
    if confidence > 0 and pieces.any():
        ids = np.unique(pieces[pieces > 0])
        sure = ids[ndimage.mean(semantic, pieces, index=ids) >= confidence]
        if sure.size:
            pieces = np.where(np.isin(pieces, sure), pieces, 0)
    diameters = np.sort(equivalent_diameters(pieces))
    diameters = diameters[diameters >= MIN_DIAMETER]
    if not diameters.size:
        return None
    # the diameter of the piece that holds the median foreground pixel: specks hold little area
    area = np.cumsum(diameters ** 2)
    by_area = diameters[np.searchsorted(area, area[-1] / 2)]
    return float(np.median(diameters[diameters >= SPECK_RATIO * by_area]))
