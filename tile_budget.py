"""The tile size that keeps prediction under a memory cap (`[valid] max_memory_mb`).

    budget = measure_budget(members, cfg.valid, device, cfg.valid.max_memory_mb)
    valid = budget.valid_for(cfg.valid, height, width)   # [valid] with the tile size that fits
    probs = predict_image(members, image, valid, device=device)

Memory while predicting one image = the weights of every member (`fixed`), the image-sized buffers
(the prepared input, 3 floats a pixel, and the maps that `inference.predict_image` sums and blends:
two floats a pixel a head, plus the blending weights: `image_bytes_per_pixel`), and the peak of one
tile through one network with every TTA view in its batch, which grows with the tile's pixels:
`intercept + bytes_per_pixel * side**2`. The last is found per member by predicting two square
probe tiles (sides `PROBE_SIDES` rounded to the network stride) and fitting the line; the largest
member's intercept and slope count. On CUDA the probes are measured (`torch.cuda.max_memory_allocated` above what was
allocated before); on a CPU, where no allocator reports its peak, they are estimated as the peak
of the network's module outputs that are alive at once (tracked with forward hooks and weak
references), plus the input batch and the output maps.

On CUDA the cap is also checked as prediction runs (`CappedPredictor`): every image's peak is read
from the allocator, and an image that went over the cap is predicted again with the tile side its
own peak asks for; the corrected slope then holds for the images after it. So a probe fit that was
too low costs one image's time twice, not the cap. A CPU reports no peak, and its estimate is used
as it is.

The cap counts the memory PyTorch allocates. It does not count the CUDA context (several hundred
MB on recent cards) or memory the caching allocator holds without using it, which `nvidia-smi`
shows: leave room for them. With `[pre] size_norm` images are rescaled (up to 4x a side) before
they are tiled; the image buffers are counted at the image's own size.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass

import torch

from config import InputError, ValidConfig
from inference import Member, predict_image, predict_model

# probe tile sides: on CUDA large enough that the per-pixel part dominates the fixed part (the
# float16 copies of the weights that autocast caches, the cuDNN workspace), which at 64 and 128
# pixels it does not (docs/predict.md); on a CPU the estimate has no fixed part, and small is fast
PROBE_SIDES = {"cuda": (256, 512), "cpu": (64, 128)}
MB = 2 ** 20


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class LiveTensors:
    """Bytes of the tensors registered with `add` that are still alive, and their peak. Tensors
    sharing storage (views, in-place results) count once; a storage is freed with the last
    registered tensor that uses it."""

    def __init__(self):
        self.users: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.users:
            self.users[key] = 0
            self.sizes[key] = storage.nbytes()
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)
        self.users[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.users[key] -= 1
        if self.users[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.users[key]


def _estimated_peak(model: torch.nn.Module, image: torch.Tensor, valid: ValidConfig) -> int:
    """Peak bytes of module outputs alive at once while `predict_model` runs on a CPU."""
    live = LiveTensors()

    def track(value) -> None:  # a hook that returns None leaves the module's input and output alone
        for t in _tensors(value):
            live.add(t)

    hooks = [m.register_forward_hook(lambda _m, _i, out: track(out)) for m in model.modules()]
    # the network's input batch (every TTA view of the tile) is alive throughout
    hooks.append(model.register_forward_pre_hook(lambda _m, args: track(args)))
    try:
        track(predict_model(model, image, valid, 0))
        return live.peak + image.untyped_storage().nbytes()
    finally:
        for hook in hooks:
            hook.remove()


def tile_peak_bytes(model: torch.nn.Module, side: int, valid: ValidConfig, device) -> int:
    """Bytes that predicting one side x side tile through `model` (with `valid`'s TTA views) adds
    at its peak: measured on CUDA, estimated on a CPU (see the module docstring)."""
    device = torch.device(device)
    whole = dataclasses.replace(valid, tile_size=0, pred_orig_size=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        image = torch.rand(3, side, side, device=device)
        predict_model(model, image, whole, 0)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    image = torch.rand(3, side, side, device=device)
    return _estimated_peak(model, image, whole)


@dataclass(frozen=True)
class TileBudget:
    """What the memory of predicting one image is made of (see the module docstring), in bytes."""
    cap: int
    fixed: int
    intercept: int
    bytes_per_pixel: float
    image_bytes_per_pixel: float
    stride: int

    def tile_for(self, height: int, width: int) -> int:
        """The largest tile side (a multiple of the stride) whose peak, with the fixed memory and
        this image's buffers, stays under the cap; an InputError when not even one stride fits."""
        free = self.cap - self.fixed - self.image_bytes_per_pixel * height * width - self.intercept
        side = int(math.sqrt(max(free, 0) / self.bytes_per_pixel)) // self.stride * self.stride
        if side < self.stride:
            need = self.fixed + self.image_bytes_per_pixel * height * width + self.intercept \
                + self.bytes_per_pixel * self.stride ** 2
            raise InputError(f"[valid] max_memory_mb = {self.cap / MB:.0f}: a {width}x{height} image needs "
                             f"at least {need / MB:.0f} MB (weights {self.fixed / MB:.0f} MB, image buffers "
                             f"{self.image_bytes_per_pixel * height * width / MB:.0f} MB); raise the cap")
        return side

    def valid_for(self, valid: ValidConfig, height: int, width: int) -> ValidConfig:
        """`valid` with tile_size = `tile_for(height, width)`, and the overlap shrunk to a quarter of
        the tile where it would be larger."""
        side = self.tile_for(height, width)
        return dataclasses.replace(valid, tile_size=side, tile_overlap=min(valid.tile_overlap, side // 4))


def measure_budget(members: list[Member], valid: ValidConfig, device, cap_mb: int) -> TileBudget:
    """Probe every member (two tiles each) and return the budget for a cap of `cap_mb` MB."""
    device = torch.device(device)
    models = [m.model for m in members]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        fixed = torch.cuda.memory_allocated(device)  # every member's weights, already on the card
    else:
        fixed = sum(t.untyped_storage().nbytes() for model in models
                    for t in (*model.parameters(), *model.buffers()))
    stride = max(model.stride for model in models)
    intercept, slope = 0.0, 0.0
    probe = PROBE_SIDES["cuda" if device.type == "cuda" else "cpu"]
    for model in models:
        sides = [max(stride, -(-s // stride) * stride) for s in probe]
        if sides[0] == sides[1]:
            sides[1] = 2 * sides[0]
        with torch.inference_mode():
            peaks = [tile_peak_bytes(model, s, valid, device) for s in sides]
        b = (peaks[1] - peaks[0]) / (sides[1] ** 2 - sides[0] ** 2)
        if b <= 0:
            b = peaks[1] / sides[1] ** 2  # a flat or falling fit: count the whole peak as per pixel
        intercept = max(intercept, peaks[1] - b * sides[1] ** 2)
        slope = max(slope, b)
    heads = max(len(model.heads) for model in models)
    image_bytes_per_pixel = 4.0 * (3 + 2 * heads + 1)
    return TileBudget(cap=cap_mb * MB, fixed=int(fixed), intercept=int(max(intercept, 0)), bytes_per_pixel=slope,
                      image_bytes_per_pixel=image_bytes_per_pixel, stride=stride)


def cuda_peak(device):
    """A `measure` for `CappedPredictor` on CUDA: runs a call and returns (its result, the peak bytes
    allocated and reserved while it ran)."""
    device = torch.device(device)

    def measure(call):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            out = call()
        except torch.OutOfMemoryError:  # a card smaller than the cap, or one shared with others
            out = None
            torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return measure


class CappedPredictor:
    """`predict_image` with the tile side of a `TileBudget`, the cap checked where the device reports
    its peak (`measure`, by default `cuda_peak` on CUDA and nothing on a CPU).

    An image whose measured peak is over the cap is predicted again with a smaller tile: the slope
    is raised to what the peak implies for the tile that ran (at least 10 % above the old one), the
    side shrinks by at least one stride, and the corrected budget is kept for later images. When
    not even one stride fits, `TileBudget.tile_for` raises its InputError. A try that runs out of
    memory (`measure` returns no result) counts as a peak a quarter over the cap. `peak_allocated` and
    `peak_reserved` are the highest peaks measured over every call (the allocator's own running
    peak is reset per image), `corrections` lists (image shape, peak bytes, old side, new side)."""

    def __init__(self, budget: TileBudget, members: list, device, measure=None):
        self.budget = budget
        self.members = members
        self.device = torch.device(device)
        self.measure = measure if measure is not None else (cuda_peak(self.device) if self.device.type == "cuda"
                                                            else None)
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.corrections: list[tuple[tuple[int, int], int, int, int]] = []

    def __call__(self, image, valid: ValidConfig, sizes: dict | None = None):
        """(probabilities, the [valid] settings that produced them) for one image."""
        height, width = image.shape[:2]
        sizes = {} if sizes is None else sizes
        while True:
            used = self.budget.valid_for(valid, height, width)
            if self.measure is None:
                return predict_image(self.members, image, used, device=self.device, sizes=sizes), used
            probs, allocated, reserved = self.measure(
                lambda: predict_image(self.members, image, used, device=self.device, sizes=sizes))
            if probs is None:  # out of memory: the peak it reached is a floor; count it as a quarter over
                allocated = max(allocated, int(1.25 * self.budget.cap))
            else:
                self.peak_allocated = max(self.peak_allocated, allocated)
                self.peak_reserved = max(self.peak_reserved, reserved)
            if probs is not None and allocated <= self.budget.cap:
                return probs, used
            # size_norm members predict the image rescaled: their tiles cover the rescaled extent
            factor = max([f for _, f in sizes.values()] + [1.0])
            self._correct((height, width), allocated, used.tile_size, factor)

    def report(self) -> list[str]:
        """One line per correction, for the run's summary."""
        return [f"memory cap: a {w}x{h} image peaked at {peak / MB:.0f} MB with tiles of {old} pixels, over the "
                f"cap of {self.budget.cap / MB:.0f} MB; it was predicted again with tiles of {new}, and later "
                f"images use the corrected fit" for (h, w), peak, old, new in self.corrections]

    def _correct(self, shape: tuple[int, int], peak: int, side: int, factor: float) -> None:
        b = self.budget
        extent = [min(side, math.ceil(n * factor)) for n in shape]  # the tile that ran
        buffers = b.fixed + b.image_bytes_per_pixel * shape[0] * shape[1] + b.intercept
        budget = dataclasses.replace(b, bytes_per_pixel=max((peak - buffers) / (extent[0] * extent[1]),
                                                            1.1 * b.bytes_per_pixel))
        new = budget.tile_for(*shape)  # an InputError when not even one stride fits
        below = (max(extent) - 1) // b.stride * b.stride  # strictly smaller than the tile that ran
        if new > below:
            if below < b.stride:
                raise InputError(f"[valid] max_memory_mb = {b.cap / MB:.0f}: a {shape[1]}x{shape[0]} image "
                                 f"peaked at {peak / MB:.0f} MB with tiles of {max(extent)} pixels; raise the cap")
            # the slope at which tile_for gives `below` for this image
            budget = dataclasses.replace(budget, bytes_per_pixel=(b.cap - buffers) / (below + b.stride / 2) ** 2)
            new = budget.tile_for(*shape)
        self.budget = budget
        self.corrections.append((shape, peak, max(extent), new))
