"""Network probability maps -> instance labels: the inverse of `dataset/targets.py`.

Pure numpy/SciPy/scikit-image (no torch), so it runs on saved predictions anywhere.

    labels = postprocess({"semantic": s, "contour": c, "marker": m}, cfg.post)  # cfg = load_config()

Steps, for the heads a model has ('semantic' always, 'contour' for CAUNet/CAMUNet, 'marker' for
CAMUNet; each a float (H, W) map in [0, 1]):

1. Seeds (one connected component = one nucleus):
   - 3 heads: marker > threshold_mark AND NOT contour > threshold_edge AND semantic > threshold;
   - 2 heads: semantic > threshold AND NOT contour > threshold_edge;
   - 1 head:  domes (h-maxima, keeping each dome's whole top) of the Euclidean distance transform
     of the semantic mask (slightly smoothed) that rise `peak_height` times the image's median
     nucleus diameter (`peak_diameter`), at most PEAK_MAX pixels, above their saddle, so touching
     round nuclei split at the neck while a ridge (an elongated or ring-shaped nucleus) stays one
     seed; small nuclei, whose necks are shallow in pixels, split as readily as usual ones.
   Thresholded seed components smaller than `SEED_MIN_SIZE` pixels are noise specks and dropped
   (distance-peak seeds are kept whatever their size: a peak is often a single pixel).
   With `seed_peaks` (2 and 3 heads), a seed component with two or more distance-transform domes
   (as for 1 head) is replaced by those domes: nuclei that the contour and marker heads cut apart
   stay apart, and those they leave joined are still split at the neck.
   With `semantic_only` the contour and marker maps are set aside and every step runs as for
   1 head: a CAUNet or CAMUNet post-processed like a UNet, to see what its other heads add.
2. Foreground: semantic > threshold, united with the seeds.
3. Partition of the foreground among the seeds:
   - 'ws': `skimage.segmentation.watershed` with markers = seeds, mask = foreground, on the
     elevation map `elevation()`: with a contour head `contour + (1 - semantic)` (low inside nuclei,
     high on predicted borders; on flat plateaus the flood is by distance from the seeds), with the
     semantic head only `-distance transform` of the foreground.
   - 'rw': `skimage.segmentation.random_walker`, solved only for the connected foreground regions
     that hold two or more seeds, each on its bounding box plus a `RW_MARGIN` pixel margin with the
     pixels outside the region inactive (label -1, removed from the graph). A region with one seed
     takes that seed's label without a solve. The data term is `rw_landscape()` and beta is
     normalised by the whole image's landscape spread, so a per-region solve gives the same answer
     as `random_walker_whole_image` (one solve over the whole image), only faster. A region whose
     seeds x pixels exceed `RW_MAX_WORK` (a clump of dozens of nuclei, or the whole image of a
     barely trained network) is split by the marker watershed of policy 'ws' instead: its solve
     would take minutes (k linear systems over the region), which made tuning stall.
4. Foreground components holding no seed (missed blobs) become instances of their own.
5. With `seam_width` (for a network trained with `[contour] exclusive`, whose mask leaves a gap of
   background where two nuclei touch): background pixels that lie within `seam_width` times the
   median nucleus diameter of two different instances go to the nearer one (`fill_seams`), so the
   gap the network drew between them is given back to the nuclei it came from.
6. Instances smaller than `min_object_size` pixels are removed, holes enclosed by one instance are
   filled with its label, and labels are renumbered 1..n (int32).
7. Instances whose mean (`confidence = median`: median) semantic probability is below
   `min_confidence` are removed (`drop_faint`; 0 keeps all): a network shown an image type it
   never saw answers its background texture with faint blobs that the threshold alone lets through.
"""
from __future__ import annotations


import numpy as np
from scipy import ndimage
from skimage.morphology import reconstruction
from skimage.segmentation import expand_labels, random_walker, relabel_sequential, watershed

from config import PostConfig  # the [post] settings: a plain dataclass, no torch
from dataset.sizes import estimate_diameter
from dataset.targets import between_nuclei

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity

# 1 head: the nucleus diameter a distance peak's height is measured against when the map shows no
# nucleus to measure (the DSB2018 median is about 17 pixels; the recipes train at 20)
PEAK_DIAMETER = 20.0
# 1 head: the most a distance peak must rise (pixels). Large nuclei come from maps that prediction
# enlarged, whose necks are blurred shallower than their size would make them: a height in
# proportion to the nucleus merged touching ones there (docs/results.md, session 13)
PEAK_MAX = 1.0
PEAK_SMOOTH = 1.0      # 1 head: Gaussian sigma applied to the distance transform before peaks
SEED_MIN_SIZE = 2      # 2-3 heads: thresholded seed components below this many pixels are dropped
RW_BETA = 130.0        # random walker beta (skimage's default), for the whole image's data spread
RW_MARGIN = 2          # pixels around a region's bounding box in a per-region random walker solve
# a region's random walker solve costs about (seeds x pixels): bench/rw_regions.py, one core,
# random data: 50 seeds in a 256x256 region 14.7 s, regions just under this cap 0.6 to 3.3 s; a
# region above it is split by the watershed instead (see the module notes)
RW_MAX_WORK = 400_000


# ---------------------------------------------------------------------------------------------
# building blocks

def _check_probs(probs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    if "semantic" not in probs:
        raise ValueError("probs needs a 'semantic' map")
    if "marker" in probs and "contour" not in probs:
        raise ValueError("a 'marker' map needs a 'contour' map too (CAMUNet has both)")
    semantic = np.asarray(probs["semantic"], np.float32)
    if semantic.ndim != 2:
        raise ValueError(f"probability maps must be (H, W), got shape {semantic.shape}")
    out = [semantic]
    for name in ("contour", "marker"):
        if name in probs:
            m = np.asarray(probs[name], np.float32)
            if m.shape != semantic.shape:
                raise ValueError(f"'{name}' map has shape {m.shape}, 'semantic' has {semantic.shape}")
            out.append(m)
        else:
            out.append(None)
    return out[0], out[1], out[2]


def _distance(mask: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(mask).astype(np.float32)


def seeds(probs: dict[str, np.ndarray], settings: PostConfig,
          diameter: float | None = None) -> tuple[np.ndarray, int]:
    """int32 (H, W) seed labels 1..n (connected components, 4-connectivity) and n. `diameter`: the
    semantic map's `peak_diameter` when already known (it does not depend on `settings`)."""
    semantic, contour, marker = _check_probs(probs)
    mask = semantic > settings.threshold
    if contour is None:
        # distance-transform peaks: one per round blob, two for two touching round nuclei
        return _distance_peaks(mask, peak_rise(semantic, settings, diameter))
    core = mask & ~(contour > settings.threshold_edge)
    if marker is not None:
        core &= marker > settings.threshold_mark
    lab, n = ndimage.label(core, structure=_CROSS)
    if n and SEED_MIN_SIZE > 1:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= SEED_MIN_SIZE
        keep[0] = False
        if not keep[1:].all():
            lab, _, _ = relabel_sequential(np.where(keep[lab], lab, 0))
            n = int(keep[1:].sum())
    if settings.seed_peaks and n:
        return _split_at_peaks(lab, n, peak_rise(semantic, settings, diameter))
    return lab.astype(np.int32), int(n)


def peak_rise(semantic: np.ndarray, settings: PostConfig, diameter: float | None = None) -> float:
    """How high (pixels) a distance peak must rise to seed a nucleus of its own: `[post] peak_height`
    times the image's median nucleus diameter (`diameter`, else `peak_diameter`), at most PEAK_MAX."""
    return min(PEAK_MAX, settings.peak_height * (peak_diameter(semantic) if diameter is None else diameter))


def peak_diameter(semantic: np.ndarray) -> float:
    """The median nucleus diameter (pixels) that distance peaks are measured against: estimated from
    the semantic map (`dataset.sizes.estimate_diameter`: pieces cut at relative necks, so the
    estimate itself does not depend on a size in pixels), PEAK_DIAMETER when it shows no nucleus."""
    diameter = estimate_diameter(semantic)
    return PEAK_DIAMETER if diameter is None else diameter


def _split_at_peaks(lab: np.ndarray, n: int, h: float) -> tuple[np.ndarray, int]:
    """Seed components with two or more distance-transform peaks (rising h pixels) replaced by
    those peaks; the others (one peak, or none: a small or thin component) stay whole."""
    peaks, m = _distance_peaks(lab > 0, h)
    if m == 0:
        return lab.astype(np.int32), n
    owner = np.zeros(m + 1, np.int64)  # the component each peak lies in (peaks lie inside the core)
    owner[peaks[peaks > 0]] = lab[peaks > 0]
    split = np.bincount(owner[1:], minlength=n + 1) >= 2
    split[0] = False
    whole = (lab > 0) & ~split[lab]
    out = np.where(whole, lab, 0).astype(np.int64)
    from_peaks = (peaks > 0) & split[lab]
    out[from_peaks] = n + peaks[from_peaks]
    out, _, _ = relabel_sequential(out)
    return out.astype(np.int32), int(out.max())


def _distance_peaks(mask: np.ndarray, h: float) -> tuple[np.ndarray, int]:
    """Seeds at the domes of the mask's (slightly smoothed) distance transform that rise h pixels."""
    dist = _distance(mask)
    if PEAK_SMOOTH > 0:
        dist = ndimage.gaussian_filter(dist, PEAK_SMOOTH) * mask
    return _domes(dist, h)


def _domes(height: np.ndarray, h: float) -> tuple[np.ndarray, int]:
    """Labelled domes of `height` that rise at least h above their surroundings.

    Like h-maxima, but a seed is the whole connected top of a dome (the pixels above its
    reconstruction from height - h), not only its highest pixels: a ridge such as that of a ring
    or an ellipse, with several equal digital maxima, gives one seed, not a string of them.
    """
    if not (height > 0).any():
        return np.zeros(height.shape, np.int32), 0
    residue = height - reconstruction(height - h, height, method="dilation")
    lab, n = ndimage.label(residue > 1e-6, structure=np.ones((3, 3), bool))
    if n == 0:
        return lab.astype(np.int32), 0
    top = np.zeros(n + 1, np.float64)
    np.maximum.at(top, lab.ravel(), residue.ravel())
    keep = top >= h - 1e-6
    keep[0] = False
    lab, _, _ = relabel_sequential(np.where(keep[lab], lab, 0))
    return lab.astype(np.int32), int(keep.sum())


def foreground(probs: dict[str, np.ndarray], settings: PostConfig, seed_labels: np.ndarray) -> np.ndarray:
    """bool (H, W): semantic > threshold, united with the seeds so that no seed is outside it."""
    return (np.asarray(probs["semantic"]) > settings.threshold) | (seed_labels > 0)


def elevation(probs: dict[str, np.ndarray], fg: np.ndarray) -> np.ndarray:
    """float32 (H, W) watershed landscape: low inside nuclei, high on their borders."""
    semantic, contour, _ = _check_probs(probs)
    if contour is None:
        return -_distance(fg)
    return contour + (1.0 - semantic)


def rw_landscape(probs: dict[str, np.ndarray], fg: np.ndarray) -> np.ndarray:
    """float32 (H, W) random walker data: high inside nuclei, falling towards their borders.

    The distance transform of the foreground, scaled to [0, 1] by its maximum, so the walkers
    split a region where it narrows (and the seeds, cut out by the contour head, set where);
    a contour head lowers it further on predicted borders.
    """
    semantic, contour, _ = _check_probs(probs)
    dist = _distance(fg)
    top = float(dist.max())
    land = dist / top if top > 0 else dist
    if contour is not None:
        land = land * (1.0 - 0.5 * contour)
    return land.astype(np.float32)


def _walker(data: np.ndarray, markers: np.ndarray, beta: float) -> np.ndarray:
    """random_walker on markers 1..k (0 unknown, -1 inactive) with scale -beta / (10 data.std()).

    Returns the label per pixel (-1 stays -1). Flat data means equal weights everywhere.
    """
    data = np.asarray(data, np.float64)
    if data.std() == 0:  # skimage would divide by zero; beta 0 gives the same equal weights
        data = data.copy()
        data.flat[0] += 1.0
        beta = 0.0
    return random_walker(data, markers, beta=beta, mode="cg_j", tol=1e-4)


def random_walker_whole_image(probs: dict[str, np.ndarray], seed_labels: np.ndarray,
                              fg: np.ndarray) -> np.ndarray:
    """The naive random walker: one solve over the whole image (background pixels inactive).

    Returns int32 (H, W) labels of the seeded foreground (seed labels 1..n), 0 elsewhere,
    including foreground components that hold no seed.
    """
    seed_labels = np.asarray(seed_labels, np.int32)
    out = np.zeros(seed_labels.shape, np.int32)
    if seed_labels.max() <= 0:
        return out
    markers = np.where(fg, seed_labels, -1).astype(np.int32)
    if not (markers == 0).any():
        return np.where(markers > 0, markers, 0).astype(np.int32)
    # seed values must be 1..k without gaps: skimage renumbers labels consecutively
    present = np.unique(seed_labels[seed_labels > 0])
    lut = np.zeros(int(seed_labels.max()) + 1, np.int32)
    lut[present] = np.arange(1, present.size + 1)
    markers[markers > 0] = lut[markers[markers > 0]]
    result = _walker(rw_landscape(probs, fg), markers, RW_BETA)
    back = np.concatenate([[0], present]).astype(np.int32)
    return np.where(result > 0, back[np.clip(result, 0, None)], 0).astype(np.int32)


def random_walker_per_region(probs: dict[str, np.ndarray], seed_labels: np.ndarray,
                             fg: np.ndarray) -> np.ndarray:
    """Random walker solved only where it matters: per connected foreground region with >= 2 seeds.

    Same output as `random_walker_whole_image`: a region with one seed takes its label, a region
    with none stays 0. Regions above `RW_MAX_WORK` (seeds x pixels) get the watershed instead.
    """
    seed_labels = np.asarray(seed_labels, np.int32)
    out = np.zeros(seed_labels.shape, np.int32)
    regions, n_regions = ndimage.label(fg, structure=_CROSS)
    if n_regions == 0 or seed_labels.max() <= 0:
        return out
    # distinct (region, seed) pairs -> seeds per region (a seed lies in exactly one region)
    has = seed_labels > 0
    pairs = np.unique(np.stack([regions[has], seed_labels[has]]), axis=1)
    count = np.bincount(pairs[0], minlength=n_regions + 1)
    one = np.zeros(n_regions + 1, np.int32)
    single = count[pairs[0]] == 1
    one[pairs[0][single]] = pairs[1][single]
    out = one[regions]  # single-seed regions at once, everything else 0
    multi = np.flatnonzero(count >= 2)
    if multi.size == 0:
        return out
    area = np.bincount(regions.ravel(), minlength=n_regions + 1)
    heavy = multi[count[multi] * area[multi] > RW_MAX_WORK]
    if heavy.size:
        inside = np.isin(regions, heavy)
        split = watershed(elevation(probs, fg), markers=np.where(inside, seed_labels, 0), mask=inside,
                          connectivity=1)
        out[inside] = split[inside]
        multi = np.setdiff1d(multi, heavy)
    land = rw_landscape(probs, fg)
    beta_ref = RW_BETA / float(land.std()) if land.std() > 0 else 0.0
    boxes = ndimage.find_objects(regions)
    h, w = fg.shape
    for r in multi:
        sl = boxes[r - 1]
        y0, y1 = max(sl[0].start - RW_MARGIN, 0), min(sl[0].stop + RW_MARGIN, h)
        x0, x1 = max(sl[1].start - RW_MARGIN, 0), min(sl[1].stop + RW_MARGIN, w)
        inside = regions[y0:y1, x0:x1] == r
        crop_seeds = np.where(inside, seed_labels[y0:y1, x0:x1], 0)
        present = pairs[1][pairs[0] == r]  # sorted seed labels of this region
        markers = np.full(inside.shape, -1, np.int32)
        markers[inside] = np.searchsorted(present, crop_seeds[inside]) + 1
        markers[inside & (crop_seeds == 0)] = 0
        data = land[y0:y1, x0:x1]
        # same effective beta as one whole-image solve: skimage divides beta by 10 * data.std()
        result = _walker(data, markers, beta_ref * float(data.std()))
        back = np.concatenate([[0], present]).astype(np.int32)
        part = out[y0:y1, x0:x1]
        part[inside] = back[np.clip(result[inside], 0, None)]
    return out


def watershed_partition(probs: dict[str, np.ndarray], seed_labels: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Marker watershed of the foreground on `elevation()`; unseeded components stay 0."""
    if seed_labels.max() <= 0:
        return np.zeros(seed_labels.shape, np.int32)
    return watershed(elevation(probs, fg), markers=seed_labels, mask=fg,
                     connectivity=1).astype(np.int32)


def fill_seams(labels: np.ndarray, radius: int) -> np.ndarray:
    """Background pixels with two different instances within `radius` pixels (a square window) take
    the label of the nearer one (`skimage.segmentation.expand_labels`); other pixels are unchanged."""
    if radius < 1 or labels.max() == 0:
        return labels
    seam = (labels == 0) & between_nuclei(labels, 2 * radius + 1)
    if not seam.any():
        return labels
    return np.where(seam, expand_labels(labels, radius), labels).astype(labels.dtype)


def seam_radius(settings: PostConfig, diameter: float) -> int:
    """`fill_seams`'s radius in pixels: `[post] seam_width` times the median nucleus diameter, at
    least one pixel (0 when seam_width is 0)."""
    return max(1, round(settings.seam_width * diameter)) if settings.seam_width > 0 else 0


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Instances with fewer than min_size pixels become background."""
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def fill_instance_holes(labels: np.ndarray) -> np.ndarray:
    """Fill every hole that one instance encloses on its own with that instance's label.

    Vectorised: the holes of the union mask are labelled, the instance labels 4-adjacent to each
    hole are gathered, and a hole bordered by exactly one instance takes its label (a gap enclosed
    jointly by several touching nuclei is left empty, as filling each nucleus alone would).
    """
    fg = labels > 0
    holes = ndimage.binary_fill_holes(fg) & ~fg
    if not holes.any():
        return labels
    hole_lab, n = ndimage.label(holes, structure=_CROSS)
    big = np.iinfo(np.int32).max
    hi = ndimage.maximum_filter(hole_lab, footprint=_CROSS, mode="constant", cval=0)
    lo = ndimage.minimum_filter(np.where(hole_lab > 0, hole_lab, big), footprint=_CROSS,
                                mode="constant", cval=big)
    border = fg & (hi > 0)
    h_ids = np.concatenate([hi[border], lo[border]])
    i_ids = np.concatenate([labels[border], labels[border]])
    ok = (h_ids > 0) & (h_ids < big)
    pairs = np.unique(np.stack([h_ids[ok], i_ids[ok]]), axis=1)
    count = np.bincount(pairs[0], minlength=n + 1)
    owner = np.zeros(n + 1, labels.dtype)
    single = count[pairs[0]] == 1
    owner[pairs[0][single]] = pairs[1][single]
    return np.where(holes, owner[hole_lab], labels)


# ---------------------------------------------------------------------------------------------

def postprocess(probs: dict[str, np.ndarray], settings: PostConfig, diameter: float | None = None) -> np.ndarray:
    """int32 (H, W) instance labels 1..n (0 background) from the probability maps of 1-3 heads.
    `diameter`: the semantic map's `peak_diameter` when already known (tuning post-processes one
    map with many settings; the estimate depends on the map alone)."""
    semantic, contour, _ = _check_probs(probs)
    if settings.semantic_only:
        probs, contour = {"semantic": semantic}, None
    if diameter is None and (settings.seam_width > 0 or contour is None):
        diameter = peak_diameter(semantic)  # estimated once for the peaks and the seams
    seed_labels, n_seeds = seeds(probs, settings, diameter)
    fg = foreground(probs, settings, seed_labels)
    if not fg.any():
        return np.zeros(semantic.shape, np.int32)
    if settings.policy == "ws":
        labels = watershed_partition(probs, seed_labels, fg)
    else:
        labels = random_walker_per_region(probs, seed_labels, fg)
    # missed blobs: foreground components with no seed are instances of their own
    rest = fg & (labels == 0)
    if rest.any():
        extra, n_extra = ndimage.label(rest, structure=_CROSS)
        labels = np.where(extra > 0, extra + n_seeds, labels)
    labels = fill_seams(labels, seam_radius(settings, diameter)) if settings.seam_width > 0 else labels
    labels = remove_small(labels, settings.min_object_size)
    if settings.fill_holes:
        labels = fill_instance_holes(labels)
    labels, _, _ = relabel_sequential(labels.astype(np.int32))
    return drop_faint(labels.astype(np.int32), semantic, settings.min_confidence, settings.confidence)


def drop_faint(labels: np.ndarray, semantic: np.ndarray, min_confidence: float,
               statistic: str = "mean") -> np.ndarray:
    """int32 labels renumbered 1..n without the instances whose mean (or median, `statistic`)
    `semantic` probability is below `min_confidence` (the last step of `postprocess`; 0 returns the
    labels as they are). The median keeps a nucleus whose textured inside the network left
    pitted with low values, as long as most of its pixels are confident."""
    if min_confidence <= 0 or labels.max() == 0:
        return labels
    ids = np.arange(1, int(labels.max()) + 1)
    summary = ndimage.median if statistic == "median" else ndimage.mean
    keep = np.concatenate([[False], np.asarray(summary(semantic, labels, index=ids)) >= min_confidence])
    out, _, _ = relabel_sequential(np.where(keep[labels], labels, 0).astype(np.int32))
    return out.astype(np.int32)
