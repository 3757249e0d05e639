"""Benchmark of the data pipeline against a training step, measured side by side in one run.

    python3 bench/data_pipeline.py ../shared/data/dsb2018/stage1_train --images 64

Prints, as a markdown table for docs/data_pipeline.md:
- augmented 256x256 samples per second with 0 and 2 DataLoader workers, cold (decoding PNGs into
  the cache) and warm (from the cache);
- target-building time (semantic, contour, marker, weight) against image size;
- one CPU training step of the three-head CAMUNet with a ResNet34 encoder on a batch of the same
  samples, and the loader's share of it (batch load time / step time).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from dataset import NucleiDataset, list_samples  # noqa: E402
from dataset.targets import make_targets  # noqa: E402
from model import build_model, multitask_loss  # noqa: E402


def loader_rate(data, workers: int, batch: int, epochs: int) -> float:
    """Samples per second over `epochs` passes (epoch numbers change the augmentation)."""
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    start, count = time.perf_counter(), 0
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for item in loader:
            count += item["image"].shape[0]
    return count / (time.perf_counter() - start)


def target_times(cfg, sizes, repeat: int) -> list[tuple[int, int, float]]:
    """(side, nuclei, seconds) for synthetic label maps of touching disks at a fixed density."""
    rows = []
    for side in sizes:
        rng = np.random.default_rng(side)
        labels = np.zeros((side, side), np.int32)
        n = side * side // 900  # about one nucleus per 30x30 pixels, as in dense DSB images
        yy, xx = np.mgrid[:side, :side]
        for i in range(1, n + 1):
            cy, cx, r = rng.integers(0, side), rng.integers(0, side), rng.integers(5, 14)
            box = (slice(max(0, cy - r), cy + r + 1), slice(max(0, cx - r), cx + r + 1))
            inside = (yy[box] - cy) ** 2 + (xx[box] - cx) ** 2 <= r * r
            labels[box][inside] = i
        make_targets(labels, cfg.contour, cfg.target)
        start = time.perf_counter()
        for _ in range(repeat):
            make_targets(labels, cfg.contour, cfg.target)
        rows.append((side, len(np.unique(labels)) - 1, (time.perf_counter() - start) / repeat))
    return rows


def step_time(cfg, data, batch: int, repeat: int) -> tuple[float, float]:
    """(seconds per training step, seconds to load one batch on the main process, warm)."""
    model = build_model(cfg.model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    items = [data[i % len(data)] for i in range(batch)]
    load = time.perf_counter() - start
    batch_dict = {k: torch.stack([it[k] for it in items]) for k in ("image", "semantic", "contour", "marker", "weight")}
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        loss, _ = multitask_loss(model(batch_dict["image"]), batch_dict, cfg.loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])), load


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder in the DSB2018 layout")
    parser.add_argument("--images", type=int, default=64, help="how many images to use (the first N by id)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="warm passes per worker setting")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    samples = [s for s in list_samples(args.root) if s.mask_paths is not None][:args.images]
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(user_path=None).replace("dataset", cache_dir=cache).replace(
            "model", model="camunet", encoder="resnet34", shared_decoder=False)
        data = NucleiDataset(samples, cfg, augment=True)
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
              f"{len(samples)} images from {args.root}")
        print("\n| loader | samples/s |\n| --- | --- |")
        print(f"| cold cache, 0 workers (decodes every PNG) | {loader_rate(data, 0, args.batch, 1):.1f} |")
        for workers in (0, 2):
            print(f"| warm cache, {workers} workers | {loader_rate(data, workers, args.batch, args.epochs):.1f} |")

        print("\n| labels side | nuclei | target build ms |\n| --- | --- | --- |")
        for side, n, seconds in target_times(cfg, (256, 512, 1024, 2048), repeat=3):
            print(f"| {side} | {n} | {1000 * seconds:.1f} |")

        step, load = step_time(cfg, data, args.batch, repeat=3)
        print(f"\n| CAMUNet ResNet34 (separate decoders), batch {args.batch} of 256x256, CPU | seconds |")
        print("| --- | --- |")
        print(f"| training step (forward + backward + Adam) | {step:.2f} |")
        print(f"| loading the batch, one process, warm | {load:.3f} |")
        print(f"| loader / step ratio | {load / step:.3f} |")


if __name__ == "__main__":
    main()
