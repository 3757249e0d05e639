"""Network inference on images of any size: the one path from an image to probability maps.

Training-time validation (`engine.evaluate`) and `valid.py` both call `predict_image`, so the score
that picks `best.pkl` is computed exactly as `valid.py --no-tuned` computes it.

    members = [Member(model, pre, name) for ...]    # a model and the [pre] it was trained with
    probs = predict_image(members, image, cfg.valid, device=device)  # {'semantic': (H, W) float32, ...}

Each member prepares the RGB uint8 image with its own `[pre]` settings (stain normalisation,
brightfield inversion, contrast stretch, CLAHE, input width when resizing), then padding to the
network stride or tiles, test-time augmentation, and the average over members. `postprocess.py` turns the maps into instances.

A member trained with `[pre] size_norm` sees every image at its training nucleus size: passes
without TTA estimate the image's median nucleus diameter (`dataset.sizes.estimate_diameter` on the
semantic map), the image is rescaled so that it becomes `[pre] nucleus_diameter` times `[valid]
diameter_scale` (`prediction_diameters`; several scales: each, maps averaged), predicted, and its
maps are resized back to the image's own size, where post-processing runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from config import InputError, PreConfig, ValidConfig
from dataset.augment import prepare_image, prepare_key, to_tensor_image
from dataset.sizes import FACTOR_MIN, estimate_diameter, size_factor
from dataset.sizes import THRESHOLD as SIZE_THRESHOLD
from dataset.tiles import tile_origins

View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

# size normalisation: at most `[valid] size_passes` estimation passes. The first sees the image as
# it is; each further one sees it at the scale the last estimate asked for, and the passes stop
# once the network sees nuclei within SIZE_TOLERANCE (a ratio) of its training size, where its
# semantic map, and so the estimate, is the most trustworthy.
SIZE_TOLERANCE = 1.25
# Nuclei far larger than the network's window come out of a pass at the image's own scale as
# fragments: a fraction of their area, which the estimate reads as nuclei of about the training
# size, so the passes stopped at once and the image was predicted at the wrong scale, shattered
# (docs/results.md, session 14). So the first pass also sees the image at 1/2, 1/4, ... of its
# size (down to FACTOR_MIN, sides of COARSE_MIN_SIDE pixels at least). Where the network sees
# nuclei whole, two neighbouring views agree on their diameter in the image's pixels; where it
# sees fragments, whose size is set by its window, not by the nuclei, the estimate in image pixels
# doubles from one view to the next coarser. The estimate comes from the finer view of the finest
# pair of neighbouring views that agree within COARSE_AGREE (session 16), counting only coarser
# views that see nuclei at least COARSE_MIN_SEEN times the target across (an image shrunk until
# its nuclei are specks marks blurred, merged blobs). When no pair agrees, the session-14 rule
# stands: the finest view that marks at least 1 / COARSE_GAIN of the most any view marks (a
# network can fill a large nucleus with fragments, so the share marked alone was fooled: four
# images of split seed 0, docs/results.md). Known mirror failure of both: a crowded image of
# small nuclei that the network is unsure of at its own scale can merge into nucleus-sized clumps
# in a coarser view and be measured there (three such images of split seed 1's 66).
COARSE_AGREE = 1.25
COARSE_GAIN = 1.5
# The further passes: on stained tissue the network can answer large nuclei with textured insides
# with fragments at the scale the first estimate asks for; the estimate then shrank to the
# fragments' size and the next pass enlarged the image further, a fixed point in which the
# fragments look like nuclei of the target size (held-out colour_tinted images, docs/results.md,
# session 19). There the first estimate came from a coarser view that saw the nuclei whole, and
# the pass at the scale it asked for marked far less of the image: after a coarser view's estimate,
# a pass marking less than 1 / COARSE_GAIN of what that view marked is not followed. (Not after an
# estimate from the image's own view: there a finer pass that marks less can be small nuclei seen
# at last, as on half-size copies of tiny nuclei in the random splits; see estimate_scale.)
COARSE_MIN_SEEN = 0.5
COARSE_MIN_SIDE = 64


@dataclass(frozen=True)
class Member:
    """One network of an ensemble with the `[pre]` settings its input needs (None: the image is
    given already prepared, as a float tensor) and a name for messages."""
    model: torch.nn.Module
    pre: PreConfig | None = None
    name: str = "model"


def pad_to_stride(x: torch.Tensor, stride: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom and right to multiples of `stride`; returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % stride, -w % stride
    if pad_h or pad_w:
        # reflect needs the pad to be smaller than the side; replicate always works
        use = mode if (mode != "reflect" or (pad_h < h and pad_w < w)) else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=use)
    return x, (h, w)


def inference_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast dtype for prediction: float16 on a GPU, None (float32) on a CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else None


def _probabilities(model, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sigmoid maps of a batch, float32, under the device's inference autocast."""
    dtype = inference_dtype(batch.device)
    with torch.autocast(batch.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model.predict(batch)


def tta_views(flips: bool, rotations: bool) -> list[View]:
    """(transform, inverse) pairs acting on the last two axes of a tensor.

    flips: identity, horizontal, vertical, both. rotations: also 90 and 270 degrees, alone and
    combined with a horizontal flip, so all eight symmetries of the square are used.
    """
    views: list[View] = [(lambda x: x, lambda x: x)]
    if flips:
        views += [
            (lambda x: x.flip(-1), lambda x: x.flip(-1)),
            (lambda x: x.flip(-2), lambda x: x.flip(-2)),
            (lambda x: x.flip(-1, -2), lambda x: x.flip(-1, -2)),
        ]
    if rotations:
        views += [
            (lambda x: x.rot90(1, (-2, -1)), lambda x: x.rot90(-1, (-2, -1))),
            (lambda x: x.rot90(-1, (-2, -1)), lambda x: x.rot90(1, (-2, -1))),
            (lambda x: x.rot90(1, (-2, -1)).flip(-1), lambda x: x.flip(-1).rot90(-1, (-2, -1))),
            (lambda x: x.rot90(-1, (-2, -1)).flip(-1), lambda x: x.flip(-1).rot90(1, (-2, -1))),
        ]
    return views


@torch.inference_mode()
def _predict_padded(model, image: torch.Tensor, views: list[View], pad_mode: str) -> dict[str, torch.Tensor]:
    """One model on one (1, 3, H, W) batch: every TTA view in one forward pass, each undone, averaged.

    Returns {head: (H, W) float32 probabilities}.
    """
    padded, (h, w) = pad_to_stride(image, model.stride, pad_mode)
    if padded.shape[-1] != padded.shape[-2] and len(views) > 4:
        # rotated views of a non-square image differ in shape: run them one by one
        outs = [_probabilities(model, fwd(padded)) for fwd, _ in views]
        return {k: torch.stack([inv(o[k]) for o, (_, inv) in zip(outs, views)]).mean(0)[0, 0, :h, :w]
                for k in outs[0]}
    batch = torch.cat([fwd(padded) for fwd, _ in views])
    out = _probabilities(model, batch)
    return {k: torch.stack([inv(v[i:i + 1]) for i, (_, inv) in enumerate(views)]).mean(0)[0, 0, :h, :w]
            for k, v in out.items()}


def tile_layout(size: int, tile_size: int, overlap: int, stride: int) -> tuple[int, list[int]]:
    """(tile length, tile starts) along one axis of `size` pixels.

    A side up to `tile_size` is one tile. A longer side gets the fewest tiles of at most
    `tile_size` pixels that overlap by at least `overlap`, each shrunk (to a multiple of `stride`)
    so that they share the side evenly: only the overlaps are computed twice, never a nearly
    whole extra tile. 1030 pixels with tile_size 1024 and overlap 64 give two 576-pixel tiles.
    """
    if size <= tile_size:
        return size, [0]
    if overlap >= tile_size:
        raise InputError(f"[valid] tile_overlap {overlap} must be below tile_size {tile_size}")
    n = math.ceil((size - overlap) / (tile_size - overlap))
    tile = min(math.ceil((size + (n - 1) * overlap) / n / stride) * stride, size)
    return tile, tile_origins(size, tile, tile - overlap)


def taper(height: int, width: int, overlap: int) -> torch.Tensor:
    """(height, width) blending weights: 1 in the middle, falling linearly over `overlap` pixels to
    a small positive value at the edges, so overlapping tiles fade into each other."""
    def ramp(n: int) -> torch.Tensor:
        r = torch.ones(n)
        k = min(overlap, n // 2)
        if k > 0:
            edge = (torch.arange(k, dtype=torch.float32) + 0.5) / k
            r[:k] = edge
            r[-k:] = torch.minimum(r[-k:], edge.flip(0))
        return r
    return ramp(height)[:, None] * ramp(width)[None, :]


def _predict_tiled(model, image: torch.Tensor, views, valid: ValidConfig) -> dict[str, torch.Tensor]:
    """Overlapping tiles blended with tapered weights; memory is bounded by the tile size."""
    h, w = image.shape[-2:]
    tile_h, ys = tile_layout(h, valid.tile_size, valid.tile_overlap, model.stride)
    tile_w, xs = tile_layout(w, valid.tile_size, valid.tile_overlap, model.stride)
    weight = taper(tile_h, tile_w, valid.tile_overlap).to(image.device)
    total: dict[str, torch.Tensor] = {}
    norm = torch.zeros(h, w, device=image.device)
    for y in ys:
        for x in xs:
            out = _predict_padded(model, image[..., y:y + tile_h, x:x + tile_w], views, valid.pad_mode)
            for k, v in out.items():
                total.setdefault(k, torch.zeros(h, w, device=image.device))[y:y + tile_h, x:x + tile_w] += weight * v
            norm[y:y + tile_h, x:x + tile_w] += weight
    return {k: v / norm for k, v in total.items()}


def predict_model(model, image: torch.Tensor, valid: ValidConfig, width: int) -> dict[str, torch.Tensor]:
    """One model on one prepared float image (3, H, W) in [0, 1] on the model's device
    -> {head: (H, W) float32 probabilities}."""
    views = tta_views(valid.test_time_augment, valid.tta_rotate)
    batch = image[None]
    h, w = image.shape[-2:]
    if not valid.pred_orig_size:
        # the network sees the image at its training scale, then the maps are resized back
        small = F.interpolate(batch, size=(width, width), mode="bilinear", align_corners=False)
        out = _predict_padded(model, small, views, valid.pad_mode)
        return {k: F.interpolate(v[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                for k, v in out.items()}
    if valid.tile_size and max(h, w) > valid.tile_size:
        return _predict_tiled(model, batch, views, valid)
    return _predict_padded(model, batch, views, valid.pad_mode)


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(height, width) of an image rescaled by `factor`, at least one pixel each."""
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def rescale_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) float image resized to `size` as training's `scaled_crop` resizes samples (OpenCV,
    area averaging when it shrinks, bilinear when it enlarges), so the network sees a rescaled
    image at prediction as it saw one in training."""
    h, w = image.shape[-2:]
    if (h, w) == tuple(size):
        return image
    interpolation = cv2.INTER_AREA if size[0] * size[1] < h * w else cv2.INTER_LINEAR
    array = image.permute(1, 2, 0).float().cpu().numpy()
    out = cv2.resize(array, (size[1], size[0]), interpolation=interpolation)
    out = out.reshape(size[0], size[1], -1)  # OpenCV drops a single channel's axis
    return torch.from_numpy(out).permute(2, 0, 1).to(image.device, image.dtype)


def resize_maps(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probability maps (H, W) or (C, H, W) resized to `size`: bilinear, with torch's antialias
    when they shrink."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] * size[1] < x.shape[-2] * x.shape[-1]
    batch = x.reshape(1, -1, *x.shape[-2:])
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.reshape(*x.shape[:-2], *size)


def prediction_diameters(pre: PreConfig, valid: ValidConfig) -> tuple[float, ...]:
    """The median nucleus diameters in pixels that a size-normalised member predicts at: its training
    diameter `[pre] nucleus_diameter` times each `[valid] diameter_scale`. Training draws nuclei from
    half to twice the training diameter (`[pre] rescale_min`, `rescale_max`), so a scale above 1
    shows the network nuclei it knows with more pixels across their borders, at more pixels to
    predict. The first is where the image's nucleus size is estimated (`prediction_diameter`)."""
    return tuple(pre.nucleus_diameter * scale for scale in valid.diameter_scale)


def prediction_diameter(pre: PreConfig, valid: ValidConfig) -> float:
    """The first of `prediction_diameters`: the size the estimation passes aim at."""
    return prediction_diameters(pre, valid)[0]


ViewSize = tuple[float | None, float, float]  # one view's (median diameter seen, share marked, scale)


def _look(model, image: torch.Tensor, valid: ValidConfig, width: int, factor: float) -> ViewSize:
    """One estimation pass at `factor`: (median nucleus diameter seen, in the rescaled image's pixels,
    or None; the share of its pixels marked nucleus; the scale actually applied, from the rounded size)."""
    h, w = image.shape[-2:]
    size = scaled_size(h, w, factor)
    semantic = predict_model(model, rescale_image(image, size), valid, width)["semantic"].float().cpu().numpy()
    return estimate_diameter(semantic), float((semantic > SIZE_THRESHOLD).mean()), math.sqrt(size[0] * size[1] / (h * w))


def _first_view(views: list[ViewSize], target: float) -> ViewSize:
    """Of the first pass's views (`_look`'s triples, the image's own scale first, then each half the
    last), the one whose estimate stands: the finer of the finest two neighbours that agree on the
    diameter in image pixels, else the finest that marks about as much as any (see COARSE_AGREE)."""
    whole = [v[0] is not None and (i == 0 or v[0] >= COARSE_MIN_SEEN * target) for i, v in enumerate(views)]
    for i in range(len(views) - 1):
        (fine, _, fine_scale), (coarse, _, coarse_scale) = views[i], views[i + 1]
        ratio = (fine / fine_scale) / (coarse / coarse_scale) if whole[i] and whole[i + 1] else 0.0
        if ratio and abs(math.log(ratio)) <= math.log(COARSE_AGREE):
            return views[i]
    # the image's own view and the coarser ones that see whole nuclei, finest first; the coarser
    # view that marks the most always qualifies, so one is found
    candidates = [views[0]] + [v for v, ok in zip(views[1:], whole[1:]) if ok]
    most = max(v[1] for v in candidates[1:]) if len(candidates) > 1 else 0.0
    return next(v for v in candidates if v[1] * COARSE_GAIN >= most)


def estimate_scale(model, image: torch.Tensor, valid: ValidConfig, width: int, target: float,
                   passes: int | None = None) -> tuple[float | None, float]:
    """(estimated median nucleus diameter in the image's own pixels, or None when no pass saw a
    nucleus; the rescale factor that brings it to `target`, clamped as `dataset.sizes.size_factor`).

    Passes without TTA: the first at the image's own scale and at 1/2, 1/4, ..., of which one gives
    the first estimate (`_first_view`: views that agree, see COARSE_AGREE); each further pass at
    the factor the last estimate gave, `passes` in all at most (default `[valid] size_passes`; the
    coarser views of the first count as one). An image far from the network's scale, whose first
    estimate is off, is thus measured again nearer the right scale before it is predicted. When the
    first estimate comes from a coarser view, a further pass that marks less than 1 / COARSE_GAIN of
    the image that view marked sees fragments of the nuclei it saw whole (rescaling an image does
    not change the share its nuclei cover), so the passes stop there and the estimate stands.
    """
    quick = dataclasses.replace(valid, test_time_augment=False, tta_rotate=False)
    passes = valid.size_passes if passes is None else passes
    h, w = image.shape[-2:]
    views = [_look(model, image, quick, width, 1.0)]
    coarse = 0.5
    while coarse >= FACTOR_MIN and min(scaled_size(h, w, coarse)) >= COARSE_MIN_SIDE:
        views.append(_look(model, image, quick, width, coarse))
        coarse /= 2
    seen, marked, scale = _first_view(views, target)
    from_coarser = scale < 1.0  # the first estimate comes from a view coarser than the image
    diameter, factor = None, scale  # scale: that of the pass that gave `seen` (1 when it saw none)
    for done in range(passes):
        if done:
            again, share, again_scale = _look(model, image, quick, width, factor)
            if from_coarser and again is not None and share * COARSE_GAIN < marked:
                break  # fragments of the nuclei the coarser view saw whole: its estimate stands
            seen, scale = again, again_scale
        if seen is None:
            break  # no nucleus at this scale: the last estimate stands (none at all: factor 1)
        diameter = seen / scale
        previous, factor = factor, size_factor(diameter, target)
        if abs(math.log(seen / target)) <= math.log(SIZE_TOLERANCE) or factor == previous:
            break
    return diameter, factor


def predict_normalised(model, image: torch.Tensor, valid: ValidConfig, width: int,
                       targets: float | tuple[float, ...],
                       factor: float | None = None) -> tuple[dict[str, torch.Tensor], float | None, float]:
    """`predict_model` at the nucleus size `targets` (pixels; several: at each, maps averaged): the
    image is rescaled by the factor `estimate_scale` gives for the first target (or by `factor`
    when given, with no estimate; the other targets scale it in proportion), predicted with
    `valid`'s TTA, padding and tiles, and every map is resized back to the image's size. An image
    in which the estimate saw no nucleus is predicted once, as it is. Returns (maps, estimated
    diameter or None, the first target's factor)."""
    targets = (targets,) if isinstance(targets, (int, float)) else tuple(targets)
    diameter = None
    if factor is None:
        diameter, factor = estimate_scale(model, image, valid, width, targets[0])
        factors = [factor] if diameter is None else [size_factor(diameter, t) for t in targets]
    else:
        factors = [size_factor(targets[0] / factor, t) for t in targets]
    h, w = image.shape[-2:]
    total: dict[str, torch.Tensor] = {}
    unique = list(dict.fromkeys(factors))  # two targets clamped to one limit are predicted once
    for f in unique:
        out = predict_model(model, rescale_image(image, scaled_size(h, w, f)), valid, width)
        for k, v in out.items():
            v = resize_maps(v, (h, w))
            total[k] = total[k] + v if k in total else v
    return {k: v / len(unique) for k, v in total.items()}, diameter, factor


def _member(m) -> Member:
    return m if isinstance(m, Member) else Member(m)


def member_input(member: Member, image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The float (3, H, W) input a member needs: an RGB uint8 image prepared with the member's
    `[pre]`, or a float tensor taken as already prepared."""
    if isinstance(image, torch.Tensor):
        return image
    if member.pre is None:
        return to_tensor_image(image)
    return to_tensor_image(prepare_image(image, member.pre))


def predict_image(members: list, image: np.ndarray | torch.Tensor, valid: ValidConfig,
                  width: int | None = None, device: torch.device | str = "cpu",
                  sizes: dict | None = None) -> dict[str, np.ndarray]:
    """Ensemble prediction for one image -> {head: float32 (H, W) in [0, 1]} as numpy.

    members: `Member`s (or bare models, which take the image as it is). image: RGB uint8
    (H, W, 3), prepared by each member with its own `[pre]`; or a float (3, H, W) tensor in [0, 1]
    that is already prepared. Each head's map is averaged over the members that have that head
    (so CAUNet and CAMUNet checkpoints combine); with `ensemble = vote` and two or more members each
    map is binarised at 0.5 first, giving the share of votes. `width`: the input side for
    `pred_orig_size = False` when a member has no `[pre]`. A member whose `[pre]` has `size_norm`
    predicts the image rescaled to its `prediction_diameters` (`predict_normalised`); `sizes`, when
    given, receives {member name: (estimated median diameter or None, the first scale's rescale
    factor)} for them.
    """
    members = [_member(m) for m in members]
    for member in members:
        if member.pre is not None and member.pre.size_norm and not valid.pred_orig_size:
            raise InputError(f"{member.name} was trained with [pre] size_norm, which sets the prediction scale "
                             f"itself: set [valid] pred_orig_size = True")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    prepared: dict[tuple, torch.Tensor] = {}
    vote = valid.ensemble == "vote" and len(members) > 1
    for member in members:
        key = prepare_key(member.pre)
        if key not in prepared:
            prepared[key] = member_input(member, image).to(device)
        side = member.pre.width if member.pre is not None else (width or 256)
        if member.pre is not None and member.pre.size_norm:
            maps, diameter, factor = predict_normalised(member.model, prepared[key], valid, side,
                                                        prediction_diameters(member.pre, valid))
            if sizes is not None:
                sizes[member.name] = (diameter, factor)
        else:
            maps = predict_model(member.model, prepared[key], valid, side)
        for k, v in maps.items():
            v = (v > 0.5).float() if vote else v
            sums[k] = sums[k] + v if k in sums else v
            counts[k] = counts.get(k, 0) + 1
    return {k: (sums[k] / counts[k]).float().cpu().numpy() for k in sums}
