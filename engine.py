"""One epoch of training and one validation pass; `train.py` strings them together."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable

import torch
from tqdm.auto import tqdm

from config import Config, InputError
from dataset.targets import make_targets
from distributed import SINGLE, World
from metrics import match
from model import iou_score, multitask_loss
from model.checkpoint import unwrap
from postprocess import postprocess

TARGETS = ("semantic", "contour", "marker", "weight")


class NonFiniteLoss(InputError):
    """The loss became NaN or infinite; training stops and keeps the last good checkpoint."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class RunningMean:
    def __init__(self):
        self.total = defaultdict(float)
        self.count = defaultdict(int)

    def add(self, name: str, value: float, n: int = 1) -> None:
        self.total[name] += value * n
        self.count[name] += n

    def means(self) -> dict[str, float]:
        return {k: self.total[k] / self.count[k] for k in self.total}


CPU_BF16_UNITS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo, or None where there is no such file or field."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_bf16_units() -> dict[str, bool]:
    """Which of the CPU's bfloat16 units (AMX-BF16, AVX512-BF16) this machine has, as PyTorch's
    torch.cpu.get_capabilities() reports them; the flags of /proc/cpuinfo where it cannot."""
    try:
        caps = torch.cpu.get_capabilities()
        return {unit: bool(caps.get(unit, False)) for unit in CPU_BF16_UNITS}
    except (AttributeError, RuntimeError):  # a PyTorch without the query, or a CPU it cannot read
        flags = set((_cpuinfo_field("flags") or "").split())
        return {unit: unit in flags for unit in CPU_BF16_UNITS}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform module), for benchmark rows."""
    import platform
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def choose_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for `[train] amp` on `device` (None: float32) and why, in words.

    `auto` picks bfloat16 on CPUs with AMX-BF16 or AVX512-BF16 units and float32 on other CPUs
    (there bfloat16 autocast is reported to be slower than float32); on CUDA, bfloat16 on cards of
    compute capability 8.0 or more that support it natively, float16 (with loss scaling) on older
    ones. The other settings are taken as they are.
    """
    if amp != "auto":
        dtype = {"off": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[amp]
        return dtype, f"[train] amp = {amp}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"amp = auto: CUDA compute capability {major}.{minor} runs bfloat16 natively"
        return torch.float16, (f"amp = auto: CUDA compute capability {major}.{minor} (below 8.0 or without "
                               f"native bfloat16): float16 with loss scaling")
    if device.type == "cpu":
        units = [unit for unit, present in cpu_bf16_units().items() if present]
        if units:
            return torch.bfloat16, f"amp = auto: this CPU has {' and '.join(units)}"
        return None, "amp = auto: this CPU has neither amx_bf16 nor avx512_bf16, where bfloat16 is slower"
    return None, f"amp = auto: float32 on {device.type}"


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for [train] amp on this device; None: full float32 (see choose_precision)."""
    return choose_precision(amp, device)[0]


def autocast_forward(model, image: torch.Tensor, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's head logits, computed under autocast to `dtype` (None: float32) and returned
    as float32, so that the losses are always computed in full precision."""
    with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(image)
    return {name: logits.float() for name, logits in outputs.items()}


def train_one_epoch(model, loader, optimizer, cfg: Config, device: torch.device, epoch: int,
                    scaler: torch.amp.GradScaler | None, stop: Callable[[], bool] | None = None,
                    show_progress: bool = True, *, first_step: int = 0,
                    before_step: Callable[[int], None] | None = None,
                    after_update: Callable[[], None] | None = None,
                    world: World = SINGLE) -> tuple[dict[str, float], int]:
    """Train over `loader` once. Returns (mean stats, number of the next batch of this epoch).

    `first_step`: batches of this epoch trained before (a resumed epoch; the loader already
    leaves them out), so the batches are numbered first_step, first_step + 1, ...; the epoch is
    complete when the returned number is first_step + len(loader). `before_step(number)` runs
    before each batch (train.py sets the learning rate there), `after_update()` after each optimizer
    step (train.py updates the weights' moving average there); `stop()` is asked after each batch
    and True ends the epoch early, after applying any accumulated gradients.

    Stats: 'loss', 'loss_<head>', 'iou_<head>', 'time' (seconds per batch), 'io' (seconds per
    batch spent waiting for data). Gradients are accumulated over `grad_accum` batches and
    clipped to `grad_clip`. A NaN or infinite loss raises NonFiniteLoss before any update.

    Under torchrun (`world`, `model` a DistributedDataParallel, `loader` one process's share of
    each global batch, see distributed.RankBatches): the processes agree on every step's global
    batch size and on a non-finite loss in any of them (one small all-reduce per batch), each
    process weighs its loss by its share of the global batch, and the stats are means over all
    processes. `stop()` must then return the same answer in every process.
    """
    train_cfg = cfg.train
    model.train()
    stats = RunningMean()
    dtype = amp_dtype(train_cfg.amp, device)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_progress, dynamic_ncols=True)
    tick = time.perf_counter()
    last = first_step + len(loader) - 1
    step = first_step - 1
    pending = 0
    for step, batch in enumerate(bar, start=first_step):
        waited = time.perf_counter() - tick
        if before_step is not None:
            before_step(step)
        batch = to_device(batch, device)
        image = batch["image"]
        if train_cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        outputs = autocast_forward(model, image, dtype)
        loss, per_head = multitask_loss(outputs, batch, cfg.loss)
        finite = bool(torch.isfinite(loss))
        n = image.shape[0]
        share = 1.0
        if world.grouped:
            if "real" in batch:  # a padding sample only keeps this process in the gradient exchange
                n = int(batch["real"].sum())
            n_global, n_bad = world.sum([n, 0.0 if finite else 1.0])
            if n_bad and finite:
                raise NonFiniteLoss(f"epoch {epoch} step {step}: the loss is not finite in {n_bad:g} of "
                                    f"{world.size} processes; stopping. Lower [train] learn_rate or check the "
                                    f"data; the last checkpoint is kept")
            share = world.size * n / n_global
        if not finite:
            raise NonFiniteLoss(f"epoch {epoch} step {step}: the loss is {loss.item()}; stopping. "
                                f"Lower [train] learn_rate or check the data; the last checkpoint is kept")
        scaled = loss * (share / train_cfg.grad_accum)
        update = pending + 1 == train_cfg.grad_accum or step == last
        # DDP exchanges gradients only on the batch of an optimizer step; the others accumulate locally
        local = model.no_sync() if world.grouped and not update else nullcontext()
        with local:
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        pending += 1
        if update:
            _step(model, optimizer, scaler, train_cfg.grad_clip, after_update)
            pending = 0
        stats.add("loss", loss.item(), n)
        for name, logits in outputs.items():
            stats.add(f"loss_{name}", per_head[name].item(), n)
            stats.add(f"iou_{name}", iou_score(torch.sigmoid(logits.detach().float()), batch[name]), n)
        elapsed = time.perf_counter() - tick
        stats.add("time", elapsed)
        stats.add("io", waited)
        means = stats.means()
        bar.set_postfix_str(f"loss {means['loss']:.4f} " + " ".join(
            f"iou({h}) {means[f'iou_{h}']:.3f}" for h in outputs) + f" {elapsed:.2f}s/b (io {waited:.2f}s)")
        tick = time.perf_counter()
        if step < last and stop is not None and stop():
            if pending:
                if world.grouped:
                    _average_gradients(model, world.size)
                _step(model, optimizer, scaler, train_cfg.grad_clip, after_update)
            break
    bar.close()
    if world.grouped:
        heads = unwrap(model).heads
        keys = ["loss", *(f"loss_{h}" for h in heads), *(f"iou_{h}" for h in heads), "time", "io"]
        return _means_over(world, stats, keys), step + 1
    return stats.means(), step + 1


def _average_gradients(model, size: int) -> None:
    """Average the gradients that batches under DDP's no_sync accumulated in each process alone."""
    import torch.distributed as dist
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= size


def _means_over(world: World, stats: RunningMean, keys: list[str]) -> dict[str, float]:
    """The means of `keys` over the samples of all processes (keys no process counted are left out)."""
    values = world.sum([stats.total[k] for k in keys] + [stats.count[k] for k in keys])
    totals, counts = values[:len(keys)], values[len(keys):]
    return {k: t / c for k, t, c in zip(keys, totals, counts) if c > 0}


def _step(model, optimizer, scaler, grad_clip: float, after_update: Callable[[], None] | None = None) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after_update is not None:
        after_update()


@torch.inference_mode()
def evaluate(model, loader, cfg: Config, device: torch.device,
             world: World = SINGLE) -> tuple[dict[str, float], dict | None]:
    """Validation pass through the one inference path (`inference.predict_image`): every image of
    `loader.dataset` (a NucleiDataset) is read, prepared with `[pre]`, predicted with `[valid]`
    padding, tiles and TTA, and post-processed with `[post]`, exactly as `valid.py --no-tuned`
    does with the checkpoint saved at this epoch.

    Returns (mean stats: 'loss', 'loss_<head>', 'iou_<head>' of the predicted probability maps
    against the targets, and 'dsb', the DSB2018 score of the instances; the first image's
    {'image', targets..., '<head>_prob'} for pictures). The losses are those of the TTA-averaged
    probabilities (as logits), so they are comparable between epochs, not with training losses.

    `[train] valid_max_images` (0: all) scores only the first that many images, `[train]
    valid_max_minutes` (0: no limit) stops the pass when the time is up (after at least one image
    per process); a cut pass says so in one line. Under torchrun (`world`) process r scores images
    r, r + size, ... and the sums are added over the processes, so the means are those of one
    process over the same images.
    """
    from inference import Member, member_input, predict_image

    bare = unwrap(model)
    bare.eval()
    data = loader.dataset
    member = Member(bare, cfg.pre, "training model")
    stats = RunningMean()
    first = None
    eps = 1e-6
    n_images = len(data)
    n_used = min(n_images, cfg.train.valid_max_images) if cfg.train.valid_max_images else n_images
    seconds = 60 * cfg.train.valid_max_minutes
    started = time.monotonic()
    done, timed_out = 0, False
    for index in range(world.rank, n_used, world.size):
        if seconds and done and time.monotonic() - started > seconds:
            timed_out = True
            break
        done += 1
        image, truth = data.decoded(index)
        probs = predict_image([member], image, cfg.valid, device=device)
        instances = postprocess(probs, cfg.post)
        stats.add("dsb", match(truth, instances).dsb)
        targets = {k: torch.from_numpy(v)[None, None] for k, v in make_targets(truth, cfg.contour, cfg.target).items()}
        maps = {k: torch.from_numpy(v)[None, None] for k, v in probs.items()}
        logits = {k: torch.logit(v.clamp(eps, 1 - eps)) for k, v in maps.items()}
        loss, per_head = multitask_loss(logits, targets, cfg.loss)
        if math.isfinite(loss.item()):
            stats.add("loss", loss.item())
        for name, prob in maps.items():
            stats.add(f"loss_{name}", per_head[name].item())
            stats.add(f"iou_{name}", iou_score(prob, targets[name]))
        if first is None:
            first = {"image": member_input(member, image)}
            first.update({k: targets[k][0] for k in TARGETS if k in targets})
            first.update({f"{k}_prob": v[0] for k, v in maps.items()})
    keys = ["dsb", "loss", *(f"loss_{h}" for h in bare.heads), *(f"iou_{h}" for h in bare.heads)]
    means = _means_over(world, stats, keys)
    done, timed_out = world.sum([done, float(timed_out)])
    if world.main and done < n_images:
        why = []
        if n_used < n_images:
            why.append(f"[train] valid_max_images = {cfg.train.valid_max_images}")
        if timed_out:
            why.append(f"[train] valid_max_minutes = {cfg.train.valid_max_minutes:g} reached")
        print(f"Validation scored {done:g} of {n_images} images ({'; '.join(why)})", flush=True)
    return means, first
