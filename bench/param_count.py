"""Print a markdown table of parameter counts: model x encoder x shared / separate decoder.

Usage: python bench/param_count.py [--n-filter N]   (default: n_filter of config_default.ini)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import load_config, run_main  # noqa: E402
from model import build_model, count_parameters  # noqa: E402
from model.encoders import ENCODERS  # noqa: E402

MODELS = ("unet", "caunet", "camunet")


def main(argv=None) -> None:
    base = load_config(user_path=None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-filter", type=int, default=base.model.n_filter,
                        help="[model] n_filter (default %(default)s)")
    args = parser.parse_args(argv)
    print(f"Parameters in millions, n_filter = {args.n_filter}, conv_order = "
          f"{base.model.conv_order}.\n")
    print("| model | encoder | shared decoder: total | without encoder "
          "| separate decoders: total | without encoder |")
    print("|---|---|---:|---:|---:|---:|")
    for model in MODELS:
        for encoder in ENCODERS:
            cells = []
            for shared in (True, False):
                cfg = base.replace("model", model=model, encoder=encoder, shared_decoder=shared,
                                   n_filter=args.n_filter, pretrained=False, weights_path=None)
                # meta tensors have shapes but no storage: counting needs no memory or init time
                with torch.device("meta"):
                    net = build_model(cfg.model)
                total = count_parameters(net)
                cells += [total, total - count_parameters(net.encoder)]
            print(f"| {model} | {encoder} | " + " | ".join(f"{c / 1e6:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    run_main(main)
