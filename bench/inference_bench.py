"""Inference speed and memory, measured side by side in one run.

    python3 bench/inference_bench.py [--encoder resnet34] [--model camunet] [--repeat 2]

Prints markdown tables for docs/inference.md:
- seconds per image (network + post-processing) at 256x256, 520x696 and 1024x1024, with TTA off
  (one view) and on (four flip views), for a randomly initialised model of the chosen kind
  (speed does not depend on the weights);
- the cost of tiles on an image just above `[valid] tile_size` (1030x1349 with tile_size 1024 and
  four flip views): whole, the even tiles `inference.tile_layout` lays out, and the fixed-step
  layout used before (four 1024x1024 tiles), side by side with their ratios to the whole image;
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
from dataset.tiles import tile_origins  # noqa: E402
from inference import _predict_padded, predict_image, tile_layout, tta_views  # noqa: E402
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


def tile_costs(models, cfg, side: tuple[int, int], tile: int, overlap: int, repeat: int) -> dict[str, tuple]:
    """{layout: (seconds, pixels computed / image pixels)} for whole, even tiles and fixed-step
    tiles, four flip views each, best of `repeat`; all three run in this process, one after the other."""
    h, w = side
    image = torch.rand(3, h, w)
    model = models[0]
    views = tta_views(True, False)

    def fixed_step():  # the layout before: full-size tiles every tile - overlap, the last one flush
        for y in tile_origins(h, tile, tile - overlap):
            for x in tile_origins(w, tile, tile - overlap):
                _predict_padded(model, image[None, :, y:y + tile, x:x + tile], views, "reflect")
    even = cfg.replace("valid", tile_size=tile, tile_overlap=overlap, test_time_augment=True).valid
    whole = cfg.replace("valid", tile_size=0, test_time_augment=True).valid
    (th, ys), (tw, xs) = tile_layout(h, tile, overlap, model.stride), tile_layout(w, tile, overlap, model.stride)
    n_fixed = len(tile_origins(h, tile, tile - overlap)) * len(tile_origins(w, tile, tile - overlap))
    runs = {"whole": (lambda: predict_image(models, image, whole), 1.0),
            "even tiles": (lambda: predict_image(models, image, even), th * tw * len(ys) * len(xs) / (h * w)),
            "fixed-step tiles": (fixed_step, n_fixed * min(tile, h) * min(tile, w) / (h * w))}
    out = {}
    for name, (run, pixels) in runs.items():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        out[name] = (min(times), pixels)
    return out


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
    side, tile, overlap = (1030, 1349), 1024, cfg.valid.tile_overlap
    print(f"\n| {side[0]}x{side[1]}, tile_size {tile}, overlap {overlap}, 4 flips | seconds | ratio to whole | "
          f"pixels computed / image pixels |")
    print("| --- | ---: | ---: | ---: |")
    costs = tile_costs(models, cfg, side, tile, overlap, args.repeat)
    for name, (seconds, pixels) in costs.items():
        print(f"| {name} | {seconds:.1f} | {seconds / costs['whole'][0]:.2f} | {pixels:.2f} |", flush=True)
    print("\n| prediction (TTA off, fresh process) | seconds | RSS with model MiB | peak rise MiB |")
    print("| --- | ---: | ---: | ---: |")
    for label, side, tile in (("1024x1024 whole", 1024, 0), ("2048x2048 whole", 2048, 0),
                              ("4096x4096 in 1024 tiles", 4096, 1024)):
        r = child_peak(side, tile, args.model, args.encoder)
        print(f"| {label} | {r['seconds']:.1f} | {r['base_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
