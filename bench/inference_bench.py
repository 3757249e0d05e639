"""Inference speed and memory, measured side by side in one run.

    python3 bench/inference_bench.py [--encoder resnet34] [--model camunet] [--repeat 2]

Prints markdown tables for docs/inference.md:
- seconds per image (network + post-processing) at 256x256, 520x696 and 1024x1024, with TTA off
  (one view) and on (four flip views), for a randomly initialised model of the chosen kind
  (speed does not depend on the weights);
- the rise of resident memory while a fresh process predicts one 4096x4096 image in 1024-pixel
  tiles, against one that predicts a 1024x1024 image whole, so the two show that tiles bound memory.
Post-processing policies are compared by bench/postprocess_bench.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from inference import predict_image  # noqa: E402
from model import build_model  # noqa: E402
from postprocess import postprocess  # noqa: E402


def seconds_per_image(models, cfg, side: tuple[int, int], tta: bool, repeat: int) -> tuple[float, float]:
    """(network seconds, post-processing seconds) per image, best of `repeat`."""
    valid = cfg.replace("valid", test_time_augment=tta).valid
    image = torch.rand(3, *side)
    net, post = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        probs = predict_image(models, image, valid, cfg.pre.width)
        middle = time.perf_counter()
        postprocess(probs, cfg.post)
        net.append(middle - start)
        post.append(time.perf_counter() - middle)
    return min(net), min(post)


def child_peak(side: int, tile: int, model: str, encoder: str) -> dict:
    """Predict one image in a fresh process; report the rise of its resident memory (MiB) above
    the level after building the model, sampled every 5 ms from /proc (ru_maxrss cannot be used:
    importing the CUDA build of torch peaks higher than CPU inference does)."""
    code = (
        "import json, sys, threading, time, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from config import load_config\nfrom inference import predict_image\nfrom model import build_model\n"
        "def rss():\n"
        "    with open('/proc/self/statm') as fh: return int(fh.read().split()[1]) * 4096 / 2**20\n"
        f"cfg = load_config(user_path=None).replace('model', model={model!r}, encoder={encoder!r})"
        f".replace('valid', tile_size={tile}, test_time_augment=False)\n"
        "net = build_model(cfg.model).eval()\n"
        f"image = torch.rand(3, {side}, {side})\n"
        "base = rss(); peak = [base]; done = threading.Event()\n"
        "def watch():\n"
        "    while not done.is_set(): peak[0] = max(peak[0], rss()); time.sleep(0.005)\n"
        "watcher = threading.Thread(target=watch); watcher.start()\n"
        "start = time.perf_counter()\n"
        "predict_image([net], image, cfg.valid, cfg.pre.width)\n"
        "seconds = time.perf_counter() - start; done.set(); watcher.join()\n"
        "print(json.dumps({'seconds': seconds, 'base_mib': base, 'peak_mib': peak[0]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="camunet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(user_path=None).replace("model", model=args.model, encoder=args.encoder)
    models = [build_model(cfg.model).eval()]
    print(f"{args.model} / {args.encoder} (separate decoders), CPU, {torch.get_num_threads()} threads, "
          f"best of {args.repeat}\n")
    print("| image | TTA | network s | post-processing s | total s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for side in ((256, 256), (520, 696), (1024, 1024)):
        for tta in (False, True):
            net, post = seconds_per_image(models, cfg, side, tta, args.repeat)
            print(f"| {side[0]}x{side[1]} | {'4 flips' if tta else 'off'} | {net:.2f} | {post:.2f} | "
                  f"{net + post:.2f} |", flush=True)
    print("\n| prediction (TTA off, fresh process) | seconds | RSS with model MiB | peak rise MiB |")
    print("| --- | ---: | ---: | ---: |")
    for label, side, tile in (("1024x1024 whole", 1024, 0), ("2048x2048 whole", 2048, 0),
                              ("4096x4096 in 1024 tiles", 4096, 1024)):
        r = child_peak(side, tile, args.model, args.encoder)
        print(f"| {label} | {r['seconds']:.1f} | {r['base_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
