"""Does `[valid] max_memory_mb` hold? Predict one large image under several caps and report the
tile side each cap's probes pick, the side prediction ended with (`tile_budget.CappedPredictor`
predicts an image again with smaller tiles when its measured peak went over the cap), the peak
memory PyTorch allocated (CUDA) over both tries and the seconds, beside the uncapped default
(tile_size 1024); and the CPU estimate of bytes per tile pixel beside the CUDA measurement for the
same network.

    python3 bench/predict_memory.py --side 3000 --caps 1500 1000 700 --out out/predict_memory.csv

The network has random weights (the memory does not depend on them): [model] as configured, by
default the GPU recipe's CAMUNet on ResNet34 with separate decoders; [valid] TTA as configured
(four flips). Run it on a GPU; on a CPU only the estimate is printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from atomic import atomic_path  # noqa: E402
from config import load_config  # noqa: E402
from inference import Member, predict_image  # noqa: E402
from model import build_model  # noqa: E402
from tile_budget import MB, CappedPredictor, measure_budget  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=3000, help="the test image is side x side pixels")
    parser.add_argument("--caps", type=int, nargs="+", default=[1500, 1000, 700], help="caps in MB")
    parser.add_argument("--model", default="camunet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--config", help="settings file read after the defaults")
    parser.add_argument("--out", help="write the rows as CSV")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, user_path=None)
    model_cfg = dataclasses.replace(cfg.model, model=args.model, encoder=args.encoder, pretrained=False)
    torch.manual_seed(0)
    cpu_model = build_model(model_cfg).eval()
    estimate = measure_budget([Member(cpu_model)], cfg.valid, "cpu", max(args.caps))
    print(f"{args.model}/{args.encoder}, TTA {'on' if cfg.valid.test_time_augment else 'off'}: CPU estimate "
          f"{estimate.bytes_per_pixel:.0f} bytes per tile pixel, tile intercept {estimate.intercept / MB:.1f} MB, "
          f"weights {estimate.fixed / MB:.1f} MB")
    if not torch.cuda.is_available():
        return
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device))
    members = [Member(cpu_model.to(device))]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (args.side, args.side, 3), dtype=np.uint8)
    yy, xx = rng.integers(0, args.side, (2, args.side))
    for y, x in zip(yy, xx):  # a few hundred bright blobs as nuclei
        image[max(0, y - 8):y + 8, max(0, x - 8):x + 8] = 200
    rows = []
    for cap in [0, *args.caps]:
        budget = None
        start = time.perf_counter()
        if cap:
            budget = measure_budget(members, cfg.valid, device, cap)
            first = budget.tile_for(args.side, args.side)
            capped = CappedPredictor(budget, members, device)
            _, valid = capped(image, cfg.valid)
            peak, reserved = capped.peak_allocated / MB, capped.peak_reserved / MB
            # the last try is what a user's later images get: it alone must be under the cap
            torch.cuda.reset_peak_memory_stats(device)
            predict_image(members, image, valid, device=device)
            torch.cuda.synchronize()
            last = torch.cuda.max_memory_allocated(device) / MB
        else:
            first = None
            valid = cfg.valid
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            predict_image(members, image, valid, device=device)
            torch.cuda.synchronize()
            peak = last = torch.cuda.max_memory_allocated(device) / MB
            reserved = torch.cuda.max_memory_reserved(device) / MB
        seconds = time.perf_counter() - start
        rows.append({"cap_mb": cap, "probed_tile": first, "tile": valid.tile_size,
                     "tries": 1 + (len(capped.corrections) if cap else 0),
                     "peak_allocated_mb": round(peak, 1), "last_try_allocated_mb": round(last, 1),
                     "peak_reserved_mb": round(reserved, 1),
                     "under_cap": (last <= cap) if cap else None, "seconds": round(seconds, 2),
                     "measured_bytes_per_pixel": round(budget.bytes_per_pixel) if budget else None,
                     "estimated_bytes_per_pixel": round(estimate.bytes_per_pixel)})
        print(rows[-1])
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)


if __name__ == "__main__":
    main()
