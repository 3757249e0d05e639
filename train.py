"""Train a UNet, CAUNet or CAMUNet on DSB2018-layout data.

    python3 train.py --epoch 200            # a run of 200 epochs (continues an interrupted run)
    python3 train.py --no-resume --lr 3e-4  # start afresh
    python3 train.py --budget 20            # stop cleanly, with a checkpoint, after 20 minutes
    %run train.py --epoch 10                # the same inside a Jupyter notebook

A run is one learning-rate schedule over a planned number of epochs, or over a wall-clock budget
(--budget), whichever ends first. When the latest checkpoint belongs to an interrupted run
(killed), train.py continues that run to its planned end, exactly where it stopped: the same
shuffle order, the same rates, with the budget that is left. When it belongs to a finished run
(all epochs done, or the budget spent), train.py starts a new run of --epoch (or [train] n_epoch)
epochs on a fresh schedule from [train] learn_rate (or --lr), keeping the weights; an epoch the
budget cut short is finished first.

Settings come from config_default.ini, ./config.ini and --config PATH. Checkpoints go to
[train] checkpoint_dir (ckpt-<epoch>.pkl every n_ckpt_epoch epochs, best.pkl by validation
score, current.json naming the latest); TensorBoard logs to [train] log_dir.

    torchrun --nproc_per_node=4 train.py --config my.ini   # DistributedDataParallel, four GPUs

Under torchrun every process trains its share of each batch of [train] n_batch samples (see
distributed.py); process 0 alone prints, logs and writes checkpoints, in the same format as one
process, so a run resumes on any number of processes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from config import Config, InputError, load_and_report, run_main
from dataset import NucleiDataset, make_sampler, training_split
from dataset.layouts import settle_normalize
from distributed import (SHM_HINT, SINGLE, Padded, RankBatches, World, is_shared_memory_error, setup,
                         sync_batch_norm)
from engine import choose_precision, evaluate, train_one_epoch
from model import build_model, count_parameters
from model.checkpoint import (latest_checkpoint, load_weights, model_config_of, read_checkpoint,
                              restore_rng_states, save_checkpoint, unwrap)
from model.ema import make_ema


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epoch", type=int,
                        help="length of the run in epochs (default [train] n_epoch): of a new run, or the new "
                             "planned length of an interrupted one, counted from its start")
    parser.add_argument("--lr", type=float, help="peak learning rate of the run; wins over [train] learn_rate "
                                                 "and over the rate of an interrupted run")
    parser.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from the latest checkpoint (default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --no-resume: delete the checkpoints of an earlier run in [train] "
                             "checkpoint_dir first (without it, such a folder is refused)")
    parser.add_argument("--budget", type=float, metavar="MINUTES",
                        help="wall-clock budget of the run; the schedule ends with it, and the run stops "
                             "cleanly with a checkpoint when it is spent (on an interrupted run: its new "
                             "total budget, counted from its start)")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only epoch lines")
    return parser.parse_args(argv)


def lr_factor(schedule: str, fraction: float, span_epochs: float, lr_step: int, lr_gamma: float,
              warmup: float = 0.0) -> float:
    """The learning rate, as a share of the peak rate, at `fraction` (0 to 1) of a schedule that
    spans `span_epochs` epochs: during the first `warmup` of it the rate rises linearly from 0;
    then cosine anneals from 1 to 0 over the rest, step multiplies by lr_gamma every lr_step
    epochs (counted from the start), constant stays at 1."""
    fraction = min(1.0, max(0.0, fraction))
    if fraction < warmup:
        return fraction / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (fraction - warmup) / (1.0 - warmup)))
    if schedule == "step":
        # the small margin keeps 99.99999... epochs from counting as fewer than 100
        return lr_gamma ** math.floor(fraction * span_epochs / lr_step + 1e-9)
    return 1.0


@dataclass
class Plan:
    """One run: a learning-rate schedule from position `start` to the end of epoch `end`, or to
    the end of a budget of `budget_s` seconds, whichever comes first.

    Positions count epochs as numbers: batch k (from 0) of epoch e (from 1) starts at
    e - 1 + k / batches. Without a budget the rate is a pure function of the position, so a
    resumed run gets the same rates as an uninterrupted one; with one, the schedule follows the
    larger of the epochs' share and the budget's spent share (`elapsed_s` carries the seconds
    spent across resumes). Stored in every checkpoint as 'run' (with 'step' and 'finished').
    """
    schedule: str
    lr: float
    lr_step: int
    lr_gamma: float
    start: float
    end: int
    seed: int
    batches: int
    warmup: float = 0.0
    budget_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def first(self) -> int:
        """The last complete epoch before the run began; the run's length counts from it."""
        return math.floor(self.start + 1e-9)

    def fraction(self, position: float, elapsed: float) -> float:
        span = self.end - self.start
        fraction = 1.0 if span <= 0 else (position - self.start) / span
        if self.budget_s:
            fraction = max(fraction, elapsed / self.budget_s)
        return min(1.0, max(0.0, fraction))

    def rate(self, position: float, elapsed: float = 0.0) -> float:
        return self.lr * lr_factor(self.schedule, self.fraction(position, elapsed), self.end - self.start,
                                   self.lr_step, self.lr_gamma, self.warmup)

    def spent(self, elapsed: float) -> bool:
        return self.budget_s is not None and elapsed >= self.budget_s

    def describe(self) -> str:
        text = f"{self.schedule} schedule from lr {self.lr:g}"
        if self.warmup:
            text += f" after a warm-up over {self.warmup:.0%} of it"
        if self.budget_s is not None:
            text += (f", ending with the epochs or with the {self.budget_s / 60:g}-min budget "
                     f"({max(0.0, self.budget_s - self.elapsed_s) / 60:.3g} min left)")
        return text

    @classmethod
    def from_record(cls, record: dict, path) -> "Plan":
        try:
            return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)
                          if f.name in record or f.default is dataclasses.MISSING})
        except (KeyError, TypeError):
            raise InputError(f"{path}: the checkpoint's run record is not understood; use --no-resume") from None


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, epoch, stream)."""
    words = np.random.SeedSequence([seed % 2**63, epoch, stream]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class EpochOrder(Sampler):
    """The order in which one epoch visits the training samples: a random permutation, or the
    weighted draws of `weighted` (a WeightedRandomSampler reading `generator`), seeded from
    (seed, epoch) alone, so a resumed run repeats it. `set_epoch(epoch, skip)` leaves out the first
    `skip` samples (the batches a resumed epoch trained before it was cut)."""

    def __init__(self, n: int, seed: int, weighted=None, generator: torch.Generator | None = None):
        self.n = n
        self.seed = seed
        self.weighted = weighted
        self.generator = generator if generator is not None else torch.Generator()
        self.loader_generator = torch.Generator()
        self.epoch = 1
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        # the DataLoader draws its workers' base seed from this one when an epoch starts
        self.loader_generator.manual_seed(epoch_seed(self.seed, epoch, 1))

    def order(self) -> list[int]:
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weighted is not None:
            return list(self.weighted)
        return torch.randperm(self.n, generator=self.generator).tolist()

    def __iter__(self):
        return iter(self.order()[self.skip:])

    def __len__(self) -> int:
        return max(0, (len(self.weighted) if self.weighted is not None else self.n) - self.skip)


def make_loaders(cfg: Config, device: torch.device, train_samples, valid_samples, seed: int,
                 world: World = SINGLE):
    train_data = NucleiDataset(train_samples, cfg, augment=True, seed=seed)
    generator = torch.Generator()
    order = EpochOrder(len(train_samples), seed, make_sampler(train_samples, cfg, generator), generator)
    if world.grouped:  # every process draws the same order and takes its share of each batch
        batches = RankBatches(order, cfg.train.n_batch, world.rank, world.size, len(train_data))
        train_loader = DataLoader(Padded(train_data), batch_sampler=batches, num_workers=cfg.train.n_worker,
                                  generator=order.loader_generator, pin_memory=device.type == "cuda")
    else:
        train_loader = DataLoader(train_data, batch_size=cfg.train.n_batch, sampler=order,
                                  num_workers=cfg.train.n_worker, generator=order.loader_generator,
                                  pin_memory=device.type == "cuda")
    valid_loader = None
    if valid_samples:
        valid_loader = DataLoader(NucleiDataset(valid_samples, cfg, augment=False), batch_size=1,
                                  num_workers=min(cfg.train.n_worker, 1))
    return train_data, order, train_loader, valid_loader


def new_plan(cfg: Config, args, start: float, n_epoch: int, batches: int) -> Plan:
    t = cfg.train
    return Plan(schedule=t.lr_schedule, lr=t.learn_rate if args.lr is None else args.lr, lr_step=t.lr_step,
                lr_gamma=t.lr_gamma, start=start, end=math.floor(start + 1e-9) + n_epoch, seed=t.seed,
                batches=batches, warmup=t.warmup, budget_s=None if args.budget is None else 60 * args.budget)


def resume_state(cfg: Config, args, model, optimizer, scaler, batches: int, ema=None):
    """Decide what this invocation trains. Returns (plan, epoch, step, best score): training goes
    on from batch `step` of epoch `epoch` when step > 0, else from epoch `epoch` + 1. Training goes
    on from the trained weights; `ema` (the weights' moving average, or None) takes up the
    checkpoint's average where it has one, and otherwise starts from the weights at the first step."""
    n_epoch = cfg.train.n_epoch if args.epoch is None else args.epoch
    folder = Path(cfg.train.checkpoint_dir)
    path = latest_checkpoint(folder) if args.resume else None
    if path is None:
        plan = new_plan(cfg, args, 0.0, n_epoch, batches)
        print(f"Starting a new training run of {n_epoch} epochs, {plan.describe()}"
              + (f" (no checkpoint in {folder})" if args.resume else ""))
        return plan, 0, 0, float("-inf")
    state = read_checkpoint(path)
    saved = model_config_of(state, path)
    ours = cfg.model
    for field in ("model", "encoder", "shared_decoder", "conv_order", "n_filter"):
        if getattr(saved, field) != getattr(ours, field):
            raise InputError(f"{path}: trained with [model] {field} = {getattr(saved, field)}, but the settings "
                             f"say {getattr(ours, field)}; change the settings or use --no-resume")
    averaged = "train_state_dict" in state
    load_weights(model, state, path, "train_state_dict" if averaged else "state_dict")
    if ema is not None and averaged:
        load_weights(ema.module, state, path)
        ema.n_averaged.fill_(int(state["ema_updates"]))
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng_states(state.get("rng"))
    best = state.get("scores", {}).get("best", float("-inf"))
    epoch = int(state["epoch"])
    record = state.get("run")
    step = int(record.get("step", 0)) if record else 0
    if step >= batches:  # the training set shrank since: the cut epoch has nothing left
        step = 0
    position = epoch - 1 + step / batches if step else float(epoch)
    where = f"in epoch {epoch} (after {step} of {batches} batches)" if step else f"at epoch {epoch}"
    if record and not record.get("finished", False):
        plan = Plan.from_record(record, path)
        plan.batches = batches
        done = (epoch - 1 if step else epoch) - plan.first
        changes = []
        if args.epoch is not None and plan.first + args.epoch != plan.end:
            if args.epoch <= done:
                raise InputError(f"--epoch {args.epoch}: the interrupted run in {path} has trained {done} of "
                                 f"its {plan.end - plan.first} epochs; give more than {done}, leave --epoch out "
                                 f"to finish it, or use --no-resume")
            changes.append(f"planned length {plan.end - plan.first} -> {args.epoch} epochs")
            plan.end = plan.first + args.epoch
        if args.lr is not None and args.lr != plan.lr:
            changes.append(f"peak lr {plan.lr:g} -> {args.lr:g}")
            plan.lr = args.lr
        if args.budget is not None and 60 * args.budget != plan.budget_s:
            if 60 * args.budget <= plan.elapsed_s:
                raise InputError(f"--budget {args.budget:g}: the interrupted run in {path} has already spent "
                                 f"{plan.elapsed_s / 60:.2f} min; give more, leave --budget out to finish it, "
                                 f"or use --no-resume")
            was = "none" if plan.budget_s is None else f"{plan.budget_s / 60:g} min"
            changes.append(f"budget {was} -> {args.budget:g} min")
            plan.budget_s = 60 * args.budget
        at = f"the rest of epoch {epoch} (from batch {step + 1} of {batches})" if step else f"epoch {epoch + 1}"
        print(f"Resuming the interrupted run in {path}: {at} of {plan.end}, {plan.describe()}"
              + (f" ({'; '.join(changes)})" if changes else ""))
        return plan, epoch, step, best
    plan = new_plan(cfg, args, position, n_epoch, batches)
    older = "" if record else " (a checkpoint without a run record counts as finished)"
    first = f", the rest of epoch {epoch} first," if step and n_epoch else ""
    print(f"Run finished {where} in {path}{older}; training {n_epoch} more epochs{first} on a fresh "
          f"{plan.describe()}")
    return plan, epoch, step, best


def earlier_run_files(folder: Path) -> list[Path]:
    """The files of an earlier run in a checkpoint folder: checkpoints, their tuned files, the pointer."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name in ("best.pkl", "current.json", "best.pkl.post.json")
        or (p.name.startswith("ckpt-") and (p.name.endswith(".pkl") or p.name.endswith(".pkl.post.json")))))


def check_samples(*datasets) -> None:
    """Decode every sample once in this process before anything is written, so a damaged file is
    one clear error here rather than a traceback from a loader worker mid-epoch (it also fills
    the decode cache)."""
    for data in datasets:
        if data is None:
            continue
        for index in range(len(data)):
            data.decoded(index)


def log_images(writer, sample: dict, epoch: int) -> None:
    writer.add_image("valid/input", sample["image"], epoch)
    for key, value in sample.items():
        if key != "image" and value.ndim == 3 and key != "weight":
            writer.add_image(f"valid/{key}", value.clamp(0, 1), epoch)


class SafeInterrupt:
    """Ctrl-C in the training loop. The first SIGINT only sets a flag, and `check()`, called before
    every batch and before validation, raises KeyboardInterrupt there: in this loop's own code,
    never inside a logger thread's lock or a file write (an interrupt that lands inside
    tensorboardX's writer can leave its close() waiting for ever). A second SIGINT raises at once.
    Installed only in the main thread; the previous handler comes back on `restore()`."""

    def __init__(self):
        self.pending = False
        self.previous = None

    def install(self) -> "SafeInterrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class NoWriter:
    """Stands in for the TensorBoard writer in the processes other than rank 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def shared_memory_error(exc: BaseException) -> InputError:
    last = [line.strip() for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
    return InputError(f"the data loader workers ran out of shared memory: {SHM_HINT} "
                      f"(PyTorch said: {last[0][:160]})")


def main(argv=None):
    """Train (see the module docstring); under torchrun as one of the processes (distributed.py)."""
    args = parse_args(argv)
    world = setup()
    # the processes other than rank 0 print nothing: one set of lines, as from one process
    with contextlib.ExitStack() as stack:
        if not world.main:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        epoch = train(args, world)
    world.close()
    return epoch


def train(args, world: World) -> int:
    cfg = load_and_report(args.config)
    if args.epoch is not None and args.epoch < 0:
        raise InputError(f"--epoch {args.epoch}: must be 0 or more")
    if args.budget is not None and args.budget <= 0:
        raise InputError(f"--budget {args.budget:g}: must be above 0 minutes")
    if world.grouped and cfg.train.n_batch < world.size:
        raise InputError(f"[train] n_batch = {cfg.train.n_batch}: fewer samples per step than the {world.size} "
                         f"processes; n_batch counts the samples of one optimizer step over all processes, "
                         f"raise it to {world.size} or more")
    torch.manual_seed(cfg.train.seed)
    device = world.device

    ckpt_dir = Path(cfg.train.checkpoint_dir)
    earlier = earlier_run_files(ckpt_dir) if not args.resume else []
    if earlier and not args.overwrite:
        raise InputError(f"{ckpt_dir}: holds the checkpoints of an earlier run ({earlier[0].name}, ...); "
                         f"--no-resume would write over them: add --overwrite to delete them, resume "
                         f"instead, or set another [train] checkpoint_dir")
    train_samples, valid_samples = training_split(cfg)
    # the checkpoint records how the images were read (percentiles or as stored), not 'auto'
    cfg = settle_normalize(cfg, train_samples)
    batches = math.ceil(len(train_samples) / cfg.train.n_batch)
    model = build_model(cfg.model)
    if cfg.train.sync_bn and world.grouped:
        model = sync_batch_norm(model, world)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    processes = ""
    if world.grouped:
        plural = "es" if world.size > 1 else ""
        processes = (f" x {world.size} process{plural} (DistributedDataParallel, {cfg.train.n_batch} samples per "
                     f"step over all, {'synchronised' if cfg.train.sync_bn else 'per-process'} batch norm)")
    print(f"{cfg.model.model} with a {cfg.model.encoder} encoder, "
          f"{'shared' if cfg.model.shared_decoder else 'separate'} decoders, "
          f"{count_parameters(model) / 1e6:.2f} M parameters, on {device}{processes}; {len(train_samples)} "
          f"training and {len(valid_samples)} validation images")
    ema = make_ema(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.learn_rate, weight_decay=cfg.train.weight_decay)
    dtype, why = choose_precision(cfg.train.amp, device)
    print(f"Precision: {'float32' if dtype is None else str(dtype).removeprefix('torch.')} ({why})")
    # float16 gradients need loss scaling; bfloat16 has float32's range and does not
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if ema is not None:
        print(f"Weights: a moving average with decay {cfg.train.ema_decay:g} per step ([train] ema_decay) is "
              f"validated and saved for prediction")
    plan, epoch, step, best = resume_state(cfg, args, model, optimizer, scaler, batches, ema)
    train_data, order, train_loader, valid_loader = make_loaders(cfg, device, train_samples, valid_samples,
                                                                 plan.seed, world)
    # rank 0 decodes (and caches) first, the other processes then read the cache
    if not world.main:
        world.barrier()
    check_samples(train_data, valid_loader.dataset if valid_loader is not None else None)
    if world.main:
        world.barrier()
        for path in earlier:
            path.unlink()
        if earlier:
            print(f"--overwrite: deleted {len(earlier)} files of the earlier run in {ckpt_dir}")

    if world.main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(cfg.train.log_dir)
    else:
        writer = NoWriter()
    bare, frozen = model, None
    first_epoch = epoch if step else epoch + 1
    started = time.monotonic()
    trained_images, trained_seconds = 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def elapsed() -> float:
        """Seconds this run has spent training, validating and saving, over all its invocations
        (with a budget under torchrun, the most of all processes, so that they agree on the rate
        and on the stop: every process must make the same calls)."""
        seconds = plan.elapsed_s + time.monotonic() - started
        return world.max(seconds) if plan.budget_s is not None else seconds
    interrupt = SafeInterrupt().install()
    try:
        for epoch in range(first_epoch, plan.end + 1):
            interrupt.check()
            freeze = epoch <= cfg.model.freeze_encoder_epochs
            if freeze != frozen:
                bare.freeze_encoder(freeze)
                frozen = freeze
                # DDP exchanges the gradients of the parameters that need one when it is built
                model = world.wrap(bare)
            first_step = step if epoch == first_epoch else 0
            train_data.set_epoch(epoch)
            order.set_epoch(epoch, first_step * cfg.train.n_batch)

            def before_step(k, epoch=epoch):
                interrupt.check()
                set_lr(optimizer, plan.rate(epoch - 1 + k / batches, elapsed()))
            stats, step = train_one_epoch(model, train_loader, optimizer, cfg, device, epoch, scaler,
                                          lambda: plan.spent(elapsed()), show_progress=not args.quiet and world.main,
                                          first_step=first_step, before_step=before_step,
                                          after_update=None if ema is None else lambda: ema.update_parameters(bare),
                                          world=world)
            trained_images += min(len(order), (step - first_step) * cfg.train.n_batch)
            trained_seconds += stats.get("time", 0.0) * (step - first_step)
            cut = step < batches
            step = step if cut else 0
            stopped = plan.spent(elapsed())
            set_lr(optimizer, plan.rate(epoch - 1 + step / batches if cut else epoch, elapsed()))
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], epoch)
            for key, value in stats.items():
                writer.add_scalar(f"train/{key}", value, epoch)
            heads = unwrap(model).heads
            line = (f"Epoch: [{epoch}] Time: {stats['time']:.3f} (io: {stats['io']:.3f}) "
                    f"Loss: {stats['loss']:.4f} " + " ".join(f"IoU({h}): {stats[f'iou_{h}']:.3f}" for h in heads))
            if cut:
                line += f" (cut after {step} of {batches} batches)"
            scores = {"train_loss": stats["loss"], "best": best}
            finished = stopped or (epoch == plan.end and not cut)
            validate = valid_loader is not None and cfg.train.n_cv_epoch and (
                epoch % cfg.train.n_cv_epoch == 0 or stopped or epoch == plan.end)
            if validate:
                interrupt.check()
                world.broadcast_buffers(bare)
                if ema is not None:
                    world.broadcast_buffers(ema.module)
                valid_stats, sample = evaluate(model if ema is None else ema.module, valid_loader, cfg, device,
                                               world)
                for key, value in valid_stats.items():
                    writer.add_scalar(f"valid/{key}", value, epoch)
                if sample is not None:
                    log_images(writer, sample, epoch)
                score = valid_stats["dsb"]
                scores.update(valid_score=score, valid_loss=valid_stats.get("loss"))
                line += f" | valid DSB score: {score:.3f} IoU(semantic): {valid_stats['iou_semantic']:.3f}"
                if score > best:
                    best = scores["best"] = score
                    run = {**dataclasses.asdict(plan), "elapsed_s": elapsed(), "step": step, "finished": finished}
                    if world.main:
                        save_checkpoint(ckpt_dir / "best.pkl", model, cfg, optimizer, None, epoch, scores,
                                        update_pointer=False, scaler=scaler, run=run, ema=ema)
            print(line, flush=True)
            if epoch % cfg.train.n_ckpt_epoch == 0 or stopped or epoch == plan.end:
                run = {**dataclasses.asdict(plan), "elapsed_s": elapsed(), "step": step, "finished": finished}
                if world.main:
                    save_checkpoint(ckpt_dir / f"ckpt-{epoch}.pkl", model, cfg, optimizer, None, epoch, scores,
                                    scaler=scaler, run=run, ema=ema)
            if stopped:
                at = (f"in epoch {epoch} of {plan.end}, after {step} of {batches} batches" if cut
                      else f"after epoch {epoch} of {plan.end}")
                print(f"Wall-clock budget of {plan.budget_s / 60:g} min spent; stopped {at}, "
                      f"with the schedule at its end (lr {optimizer.param_groups[0]['lr']:.3g}); the next "
                      f"train.py starts a fresh schedule" + (f", finishing epoch {epoch} first" if cut else ""))
                break
    except (RuntimeError, OSError) as exc:
        if is_shared_memory_error(exc):
            raise shared_memory_error(exc) from None
        raise
    finally:
        interrupt.restore()
        writer.close()
    print(f"Training finished at epoch {epoch}; checkpoints in {ckpt_dir}")
    if trained_seconds > 0:
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                  if device.type == "cuda" else "")
        print(f"Throughput: {trained_images / trained_seconds:.1f} training images/s (loading included, "
              f"validation left out){memory}")
    return epoch


if __name__ == "__main__":
    run_main(main)
