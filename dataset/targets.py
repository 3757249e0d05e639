"""Instance labels -> training targets: semantic, contour, marker and weight maps.

Pure numpy/SciPy and vectorised over the whole image: the cost grows with the number of pixels,
not with nuclei x pixels. Settings come from `[contour]` and `[target]` and act the same for every
model; a model simply ignores the maps of heads it does not have.
"""
from __future__ import annotations

import cv2
import numpy as np

from config import ContourConfig, TargetConfig

# OpenCV's morphology and distance transform are several times faster than SciPy's here
# (bench/data_pipeline.py). Its max/min filters take float32, which holds ids below 2**24 exactly.
_BIG = np.float32(2 ** 24)


def _max_filter(values: np.ndarray, size: int) -> np.ndarray:
    return cv2.dilate(values, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)


def _min_filter(values: np.ndarray, size: int) -> np.ndarray:
    return cv2.erode(values, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)


def _distance_to_zero(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of every True pixel to the nearest False pixel (float32).

    OpenCV's precise transform is exact up to its last bit, which varies from call to call (its
    threads split the work differently), and that made training runs unrepeatable. The squared
    distance is a whole number of pixels squared, so rounding it gives back the exact value every time.
    """
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # float64: a mask without a False pixel gets OpenCV's huge 'infinite' distance, whose square
    # does not fit a float32
    distance = distance.astype(np.float64)
    return np.sqrt(np.rint(distance * distance)).astype(np.float32)


def between_nuclei(labels: np.ndarray, size: int) -> np.ndarray:
    """bool (H, W): pixels whose size x size window holds two different non-zero labels, i.e. that
    lie where two nuclei touch or nearly touch (ids below 2**24)."""
    ids = labels.astype(np.float32)
    high, low = _max_filter(ids, size), _min_filter(np.where(labels > 0, ids, _BIG), size)
    return (low != _BIG) & (high != low)


def inner_distance(labels: np.ndarray) -> np.ndarray:
    """float32 (H, W): for a nucleus pixel, 1 + its distance to the nearest pixel outside its nucleus
    (so border pixels are 1); 0 on background. Touching nuclei count as outside each other.
    """
    # a 3x3 neighbour with another label or background makes a border pixel
    ids = labels.astype(np.float32)
    interior = (labels > 0) & (_max_filter(ids, 3) == ids) & (_min_filter(ids, 3) == ids)
    distance = _distance_to_zero(interior)
    distance[labels > 0] += 1.0
    return distance


def contour_map(labels: np.ndarray, contour: ContourConfig, distance: np.ndarray | None = None) -> np.ndarray:
    """bool (H, W): a ring of `thickness` pixels at nucleus borders.

    precise: the ring lies inside each nucleus; otherwise it also covers the background pixels
    within `thickness` of a nucleus. adjacent_boundary_only: only the parts of the ring within
    `thickness` + 1 pixels of another nucleus, i.e. where nuclei touch or nearly touch.
    """
    if distance is None:
        distance = inner_distance(labels)
    ring = (distance > 0) & (distance <= contour.thickness)
    if not contour.precise:
        outside = _distance_to_zero(labels == 0)
        ring |= (labels == 0) & (outside <= contour.thickness)
    if contour.adjacent_boundary_only:
        # a window holding two different non-zero labels lies between two nuclei
        ring &= between_nuclei(labels, 2 * contour.thickness + 3)
    return ring


def marker_map(labels: np.ndarray, depth: int, distance: np.ndarray | None = None) -> np.ndarray:
    """bool (H, W): each nucleus eroded by `depth` pixels; a nucleus too small to survive that keeps
    the pixels at its largest inner distance, so every nucleus has a marker.
    """
    if distance is None:
        distance = inner_distance(labels)
    n = int(labels.max())
    if n == 0:
        return np.zeros(labels.shape, bool)
    peak = np.zeros(n + 1, np.float32)
    np.maximum.at(peak, labels.ravel(), distance.ravel())
    threshold = np.minimum(np.float32(depth + 1), peak)[labels]
    return (labels > 0) & (distance >= threshold)


def centre_map(labels: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """float32 (H, W) in [0, 1]: 1 at each nucleus' deepest pixels, falling linearly to 0 at its border."""
    n = int(labels.max())
    peak = np.zeros(n + 1, np.float32)
    np.maximum.at(peak, labels.ravel(), distance.ravel())
    depth = peak[labels]
    with np.errstate(divide="ignore", invalid="ignore"):
        centre = np.where(depth > 1, (distance - 1) / (depth - 1), 0.0)
    centre[(labels > 0) & (depth <= 1)] = 1.0  # one-pixel-thin nuclei are all centre
    return centre.astype(np.float32)


def make_targets(labels: np.ndarray, contour: ContourConfig, target: TargetConfig) -> dict[str, np.ndarray]:
    """All training targets of one instance label map (int32, H x W).

    Returns float32 (H, W) maps in [0, 1]: 'semantic', 'contour', 'marker', and 'weight' (>= 1):
    1 + weight_contour on contour pixels + weight_centre x the centre map. With `detect` off the
    contour map is all zeros and adds no weight.
    """
    labels = np.asarray(labels, np.int32)
    distance = inner_distance(labels)
    foreground = labels > 0
    if contour.detect:
        ring = contour_map(labels, contour, distance)
    else:
        ring = np.zeros(labels.shape, bool)
    semantic = foreground & ~ring if contour.exclusive else foreground
    weight = 1.0 + target.weight_contour * ring + target.weight_centre * centre_map(labels, distance)
    return {
        "semantic": semantic.astype(np.float32),
        "contour": ring.astype(np.float32),
        "marker": marker_map(labels, target.marker_depth, distance).astype(np.float32),
        "weight": weight.astype(np.float32),
    }
