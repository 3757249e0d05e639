"""Network inference on images of any size: padding, resizing or tiles; flip TTA; checkpoint ensembles.

The output of this module is float probability maps; `postprocess.py` turns them into instances.

    models = [load_model(path)[0] for path in paths]
    probs = predict_image(models, image, cfg.valid, device)  # {'semantic': (H, W) float32, ...}
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from config import ValidConfig
from engine import pad_to_stride

View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


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
        outs = [model.predict(fwd(padded)) for fwd, _ in views]
        return {k: torch.stack([inv(o[k]) for o, (_, inv) in zip(outs, views)]).mean(0)[0, 0, :h, :w]
                for k in outs[0]}
    batch = torch.cat([fwd(padded) for fwd, _ in views])
    out = model.predict(batch)
    return {k: torch.stack([inv(v[i:i + 1]) for i, (_, inv) in enumerate(views)]).mean(0)[0, 0, :h, :w]
            for k, v in out.items()}


def tile_origins(size: int, tile: int, step: int) -> list[int]:
    """Tile starts covering [0, size): every `step`, the last one aligned to the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def taper(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) blending weights: 1 in the middle, falling linearly over `overlap` pixels to a
    small positive value at the edges, so overlapping tiles fade into each other."""
    ramp = torch.ones(tile)
    if overlap > 0:
        edge = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        ramp[:overlap] = edge
        ramp[-overlap:] = torch.minimum(ramp[-overlap:], edge.flip(0))
    return ramp[:, None] * ramp[None, :]


def _predict_tiled(model, image: torch.Tensor, views, valid: ValidConfig) -> dict[str, torch.Tensor]:
    """Overlapping tiles blended with tapered weights; memory is bounded by the tile size."""
    tile = math.ceil(valid.tile_size / model.stride) * model.stride
    h, w = image.shape[-2:]
    step = max(model.stride, tile - valid.tile_overlap)
    weight = taper(tile, valid.tile_overlap).to(image.device)
    total: dict[str, torch.Tensor] = {}
    norm = torch.zeros(h, w, device=image.device)
    for y in tile_origins(h, tile, step):
        for x in tile_origins(w, tile, step):
            crop = image[..., y:y + tile, x:x + tile]
            out = _predict_padded(model, crop, views, valid.pad_mode)
            th, tw = crop.shape[-2:]
            wt = weight[:th, :tw]
            for k, v in out.items():
                total.setdefault(k, torch.zeros(h, w, device=image.device))[y:y + th, x:x + tw] += wt * v
            norm[y:y + th, x:x + tw] += wt
    return {k: v / norm for k, v in total.items()}


def predict_model(model, image: torch.Tensor, valid: ValidConfig, width: int) -> dict[str, torch.Tensor]:
    """One model on one float image (3, H, W) in [0, 1] on the model's device -> {head: (H, W)}."""
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


def predict_image(models: list, image: torch.Tensor | np.ndarray, valid: ValidConfig, width: int,
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Ensemble prediction for one image -> {head: float32 (H, W) in [0, 1]} as numpy.

    image: float (3, H, W) in [0, 1], or RGB uint8 (H, W, 3). Each head's map is averaged over
    the models that have that head (so CAUNet and CAMUNet checkpoints combine); with
    `ensemble = vote` each model's map is binarised at 0.5 first, giving the share of votes.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    image = image.to(device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for model in models:
        for k, v in predict_model(model, image, valid, width).items():
            v = (v > 0.5).float() if valid.ensemble == "vote" else v
            sums[k] = sums[k] + v if k in sums else v
            counts[k] = counts.get(k, 0) + 1
    return {k: (sums[k] / counts[k]).float().cpu().numpy() for k in sums}
