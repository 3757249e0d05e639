"""Train a UNet, CAUNet or CAMUNet on DSB2018-layout data.

    python3 train.py --epoch 200            # 200 more epochs, resuming from checkpoint/current.json
    python3 train.py --no-resume --lr 3e-4  # start afresh
    python3 train.py --budget 20            # stop cleanly, with a checkpoint, after 20 minutes
    %run train.py --epoch 10                # the same inside a Jupyter notebook

Settings come from config_default.ini, ./config.ini and --config PATH. Checkpoints go to
[train] checkpoint_dir (ckpt-<epoch>.pkl every n_ckpt_epoch epochs, best.pkl by validation
score, current.json naming the latest); TensorBoard logs to [train] log_dir.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from config import Config, InputError, load_and_report, run_main
from dataset import NucleiDataset, make_sampler, training_split
from engine import amp_dtype, evaluate, train_one_epoch
from model import build_model, count_parameters
from model.checkpoint import (latest_checkpoint, load_weights, model_config_of, read_checkpoint,
                              save_checkpoint, unwrap)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epoch", type=int, help="epochs to train in this run (default [train] n_epoch)")
    parser.add_argument("--lr", type=float, help="learning rate; wins over a resumed one")
    parser.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from the latest checkpoint (default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch")
    parser.add_argument("--budget", type=float, metavar="MINUTES",
                        help="wall-clock budget; stop cleanly with a checkpoint when it is spent")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only epoch lines")
    return parser.parse_args(argv)


def make_scheduler(optimizer, cfg: Config, n_epoch: int):
    """The `[train] lr_schedule`; a cosine schedule spans the `n_epoch` epochs of this run."""
    t = cfg.train
    if t.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step, gamma=t.lr_gamma)
    if t.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, n_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def make_loaders(cfg: Config, device: torch.device):
    train_samples, valid_samples = training_split(cfg)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_data = NucleiDataset(train_samples, cfg, augment=True)
    sampler = make_sampler(train_samples, cfg, generator)
    train_loader = DataLoader(train_data, batch_size=cfg.train.n_batch, shuffle=sampler is None,
                              sampler=sampler, num_workers=cfg.train.n_worker, generator=generator,
                              pin_memory=device.type == "cuda")
    valid_loader = None
    if valid_samples:
        valid_loader = DataLoader(NucleiDataset(valid_samples, cfg, augment=False), batch_size=1,
                                  num_workers=min(cfg.train.n_worker, 1))
    return train_data, train_loader, valid_loader, len(train_samples), len(valid_samples)


def resume_state(cfg: Config, args, model, optimizer, scheduler) -> tuple[int, float]:
    """Load the latest checkpoint into the model/optimizer/scheduler; returns (epoch, best score)."""
    folder = Path(cfg.train.checkpoint_dir)
    path = latest_checkpoint(folder) if args.resume else None
    if path is None:
        print("Starting a new training run" + (f" (no checkpoint in {folder})" if args.resume else ""))
        return 0, float("-inf")
    state = read_checkpoint(path)
    saved = model_config_of(state, path)
    ours = cfg.model
    for field in ("model", "encoder", "shared_decoder", "conv_order", "n_filter"):
        if getattr(saved, field) != getattr(ours, field):
            raise InputError(f"{path}: trained with [model] {field} = {getattr(saved, field)}, but the settings "
                             f"say {getattr(ours, field)}; change the settings or use --no-resume")
    load_weights(model, state, path)
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    best = state.get("scores", {}).get("best", float("-inf"))
    print(f"Resuming from {path} (epoch {state['epoch']})")
    return int(state["epoch"]), best


def log_images(writer, sample: dict, epoch: int) -> None:
    writer.add_image("valid/input", sample["image"], epoch)
    for key, value in sample.items():
        if key != "image" and value.ndim == 3 and key != "weight":
            writer.add_image(f"valid/{key}", value.clamp(0, 1), epoch)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_and_report(args.config)
    n_epoch = cfg.train.n_epoch if args.epoch is None else args.epoch
    if n_epoch < 0:
        raise InputError(f"--epoch {n_epoch}: must be 0 or more")
    deadline = time.time() + 60 * args.budget if args.budget else None
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_data, train_loader, valid_loader, n_train, n_valid = make_loaders(cfg, device)
    model = build_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    print(f"{cfg.model.model} with a {cfg.model.encoder} encoder, "
          f"{'shared' if cfg.model.shared_decoder else 'separate'} decoders, "
          f"{count_parameters(model) / 1e6:.2f} M parameters, on {device}; {n_train} training and "
          f"{n_valid} validation images")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.learn_rate, weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, n_epoch)
    start, best = resume_state(cfg, args, model, optimizer, scheduler)
    if args.lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        model = torch.nn.DataParallel(model)
    # float16 gradients need loss scaling; bfloat16 has float32's range and does not
    scaler = torch.amp.GradScaler(device.type) if amp_dtype(cfg.train.amp, device) == torch.float16 else None

    from tensorboardX import SummaryWriter
    writer = SummaryWriter(cfg.train.log_dir)
    ckpt_dir = Path(cfg.train.checkpoint_dir)
    epoch = start
    try:
        for epoch in range(start + 1, start + n_epoch + 1):
            unwrap(model).freeze_encoder(epoch <= cfg.model.freeze_encoder_epochs)
            train_data.set_epoch(epoch)
            stats, stopped = train_one_epoch(model, train_loader, optimizer, cfg, device, epoch, scaler,
                                             deadline, show_progress=not args.quiet)
            scheduler.step()
            lr = optimizer.param_groups[0]["lr"]
            writer.add_scalar("lr", lr, epoch)
            for key, value in stats.items():
                writer.add_scalar(f"train/{key}", value, epoch)
            heads = unwrap(model).heads
            line = (f"Epoch: [{epoch}] Time: {stats['time']:.3f} (io: {stats['io']:.3f}) "
                    f"Loss: {stats['loss']:.4f} " + " ".join(f"IoU({h}): {stats[f'iou_{h}']:.3f}" for h in heads))
            scores = {"train_loss": stats["loss"], "best": best}
            validate = valid_loader is not None and cfg.train.n_cv_epoch and (
                epoch % cfg.train.n_cv_epoch == 0 or stopped or epoch == start + n_epoch)
            if validate:
                valid_stats, sample = evaluate(model, valid_loader, cfg, device)
                for key, value in valid_stats.items():
                    writer.add_scalar(f"valid/{key}", value, epoch)
                if sample is not None:
                    log_images(writer, sample, epoch)
                score = valid_stats["dsb"]
                scores.update(valid_score=score, valid_loss=valid_stats.get("loss"))
                line += f" | valid DSB score: {score:.3f} IoU(semantic): {valid_stats['iou_semantic']:.3f}"
                if score > best:
                    best = scores["best"] = score
                    save_checkpoint(ckpt_dir / "best.pkl", model, cfg, optimizer, scheduler, epoch, scores,
                                    update_pointer=False)
            print(line, flush=True)
            if epoch % cfg.train.n_ckpt_epoch == 0 or stopped or epoch == start + n_epoch:
                save_checkpoint(ckpt_dir / f"ckpt-{epoch}.pkl", model, cfg, optimizer, scheduler, epoch, scores)
            if stopped:
                print(f"Wall-clock budget of {args.budget} min spent; stopped after epoch {epoch}")
                break
    finally:
        writer.close()
    print(f"Training finished at epoch {epoch}; checkpoints in {ckpt_dir}")
    return epoch


if __name__ == "__main__":
    run_main(main)
