"""Training throughput on the CPU: each model with a ResNet34 encoder, shared and separate decoders.

    python3 bench/train_throughput.py ../shared/data/dsb2018/stage1_train --width 256 --batch 4

For every model (unet, caunet, camunet) x decoder sharing, measured side by side in one run:
- 'bare': forward + multitask loss + backward + Adam step on one fixed batch already in memory;
- 'loop': `engine.train_one_epoch` over real augmented batches from a DataLoader (2 workers),
  with its own measure of the time spent waiting for data; the second of two passes is timed,
  and it includes starting the loader's worker processes, as every real epoch does.
With --amp off bfloat16 every row is measured once per [train] amp setting, one after the other
(bfloat16 autocast pays off on CPUs with AMX or AVX512-BF16 units; `auto` measures what
engine.choose_precision picks on this machine). With --memory-format contiguous channels_last every
row is also measured once per [train] channels_last setting, one after the other. --models and
--n-filter narrow the run to the recipe's own network.
Prints a markdown table (images per second, loop/bare ratio, data-wait share) for docs/; every row
names the CPU model and the bfloat16 units PyTorch reports, so rows from different machines can
sit in one table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from dataset import NucleiDataset, list_samples  # noqa: E402
from engine import amp_dtype, autocast_forward, cpu_bf16_units, cpu_model, train_one_epoch  # noqa: E402
from model import build_model, multitask_loss  # noqa: E402

KEYS = ("image", "semantic", "contour", "marker", "weight")


def bare_rate(model, cfg, batch: dict, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    dtype = amp_dtype(cfg.train.amp, torch.device("cpu"))
    image = batch["image"]
    if cfg.train.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is dropped
        start = time.perf_counter()
        loss, _ = multitask_loss(autocast_forward(model, image, dtype), batch, cfg.loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch["image"].shape[0] / (sum(times[1:]) / steps)


def loop_rate(model, cfg, data, steps: int, batch_size: int, workers: int) -> tuple[float, float]:
    subset = torch.utils.data.Subset(data, range(min(len(data), steps * batch_size)))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    # one pass to warm up, as the bare measure drops its first step; the second is measured
    for _ in range(2):
        start = time.perf_counter()
        stats, _ = train_one_epoch(model, loader, optimizer, cfg, torch.device("cpu"), 1, None,
                                   show_progress=False)
        elapsed = time.perf_counter() - start
    return len(subset) / elapsed, stats["io"] / stats["time"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder in the DSB2018 layout")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per setting")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--n-filter", type=int, default=None, help="decoder width (default: the config's)")
    parser.add_argument("--models", nargs="+", default=["unet", "caunet", "camunet"])
    parser.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bfloat16", "auto"])
    parser.add_argument("--memory-format", nargs="+", default=["channels_last"],
                        choices=["contiguous", "channels_last"], help="[train] channels_last settings to measure")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    samples = [s for s in list_samples(args.root) if s.mask_paths is not None][:args.steps * args.batch]
    with tempfile.TemporaryDirectory() as cache:
        base = load_config(user_path=None).replace("dataset", cache_dir=cache).replace("pre", width=args.width)
        data = NucleiDataset(samples, base, augment=True)
        for i in range(len(data)):
            data.decoded(i)  # fill the decode cache, as after the first epoch of a real run
        items = [data[i] for i in range(args.batch)]
        batch = {k: torch.stack([it[k] for it in items]) for k in KEYS}
        print(f"CPU, {torch.get_num_threads()} torch threads, {args.encoder} encoder, batch {args.batch} of "
              f"{args.width}x{args.width}, {args.steps} steps per row, {args.workers} loader workers\n")
        units = ", ".join(unit for unit, present in cpu_bf16_units().items() if present) or "none"
        machine = f"{cpu_model()} | {units}"
        print("| model | decoders | amp | memory format | params (M) | bare img/s | loop img/s | loop / bare "
              "| data wait share | CPU | bf16 units |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for name in args.models:
            for shared in (True, False):
                if name == "unet" and not shared:
                    continue  # one head: shared and separate are the same network
                cfg = base.replace("model", model=name, encoder=args.encoder, shared_decoder=shared)
                if args.n_filter:
                    cfg = cfg.replace("model", n_filter=args.n_filter)
                for amp in args.amp:
                    for memory_format in args.memory_format:
                        last = memory_format == "channels_last"
                        cfg = cfg.replace("train", amp=amp, channels_last=last)
                        model = build_model(cfg.model)
                        if last:
                            model = model.to(memory_format=torch.channels_last)
                        params = sum(p.numel() for p in model.parameters()) / 1e6
                        bare = bare_rate(model, cfg, batch, args.steps)
                        loop, wait = loop_rate(model, cfg, data, args.steps, args.batch, args.workers)
                        dtype = amp_dtype(amp, torch.device("cpu"))
                        shown = amp if amp != "auto" else f"auto ({'float32' if dtype is None else 'bfloat16'})"
                        print(f"| {name} | {'shared' if shared else 'separate'} | {shown} | {memory_format} | "
                              f"{params:.2f} | {bare:.2f} | {loop:.2f} | {loop / bare:.2f} | {100 * wait:.1f}% | "
                              f"{machine} |", flush=True)


if __name__ == "__main__":
    main()
