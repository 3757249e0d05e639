"""Export a checkpoint as a network that runs outside this repository: TorchScript, and ONNX.

    python3 export.py out/demo/checkpoint/best.pkl -o model.pt               # TorchScript
    python3 export.py best.pkl -o model.pt --onnx model.onnx                 # and ONNX

The exported network takes an image batch, float32 (N, 3, H, W), RGB, the 8-bit image divided by
255 (any H and W), and returns the heads' probability maps, float32 (N, K, H, W) in [0, 1], one
channel per head in the order the JSON's "heads" lists. Inside it does what `inference.py` does for
one checkpoint without test-time augmentation: the checkpoint's `[pre] stretch` (per image, where
the checkpoint uses it and no CLAHE follows it), padding to the network stride with `[valid]
pad_mode`, the network, the sigmoid, and the crop back to H x W. What it cannot do (CLAHE, the
nucleus-size rescale of `[pre] size_norm`, the resize of `pred_orig_size = False`, tiles, TTA,
post-processing) is listed in the JSON written beside each file (`<output>.json`, also stored
inside the TorchScript file as the extra file `nuclei_export.json` and in the ONNX file's
metadata), together with the checkpoint's settings and the `[post]` values to turn the maps into
instances (an explicit config setting, else the tuned `<checkpoint>.post.json`, else the
checkpoint's own; see tuning.resolve_post). docs/export.md shows how to use the files.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import sys
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atomic import atomic_path
from config import Config, InputError, load_and_report, load_config, run_main, under_saved
from dataset.augment import stretch_contrast
from model import build_model
from model.checkpoint import load_weights, model_config_of, read_checkpoint
from tuning import resolve_post, tuned_path

FORMAT = "nuclei-unet-export-1"
EXTRA_FILE = "nuclei_export.json"
_STRETCH = {k: float(p.default) for k, p in inspect.signature(stretch_contrast).parameters.items()
            if k in ("low", "high", "min_range")}


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """`np.percentile(row, 100 * q)` (method 'linear') of every row of sorted float64 `values`
    (N, M) -> (N, 1), by numpy's own formula, so the exported stretch matches
    `dataset.augment.stretch_contrast` to the last bit. Positions come from tensors, not Python
    ints, so one traced or exported graph serves every image size."""
    last = values.shape[1] - 1
    count = torch.ones_like(values[:1]).sum(dim=1, keepdim=True)  # M as float64, exact below 2**53
    position = (count - 1) * q
    below = position.floor()
    gamma = position - below
    index = below.long().expand(values.shape[0], 1)
    a = values.gather(1, index)
    b = values.gather(1, (index + 1).clamp(max=last))
    diff = b - a
    return torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def _pad_index(size: int, padded: int, reflect: torch.Tensor) -> torch.Tensor:
    """Source indices along one axis for padding `size` pixels to `padded` at the end: mirrored
    without repeating the edge (reflect) where `reflect` is true, else the edge repeated."""
    i = torch.arange(padded)
    mirrored = torch.where(i < size, i, 2 * (size - 1) - i)
    return torch.where(reflect, mirrored, i.clamp(max=size - 1))


class ExportedNetwork(nn.Module):
    """The exported computation: image batch (N, 3, H, W) float in [0, 1] -> probability maps
    (N, K, H, W) float32, K = len(heads).

    `net` is the UNet (for ONNX) or its trace (for TorchScript); either maps a stride-multiple
    batch to {head: logits}. Padding is written with index gathers rather than F.pad so that its
    amount, and the fallback from reflect to replicate for images smaller than the padding
    (`inference.pad_to_stride`), are computed from the input's size inside the graph.
    """

    def __init__(self, net: nn.Module, heads: list[str], stride: int, pad_mode: str, stretch: bool):
        super().__init__()
        self.net = net
        self.heads = list(heads)
        self.stride = int(stride)
        self.pad_mode = pad_mode
        self.stretch = bool(stretch)
        self.low = _STRETCH["low"] / 100
        self.high = _STRETCH["high"] / 100
        self.min_range = _STRETCH["min_range"]

    def stretch_contrast(self, image: torch.Tensor) -> torch.Tensor:
        """`dataset.augment.stretch_contrast` on every image of the batch, on its 8-bit values."""
        n = image.shape[0]
        values = torch.round(image.double() * 255).clamp(0, 255)
        ordered = values.reshape(n, -1).sort(dim=1).values
        lo = _percentile(ordered, self.low)
        hi = torch.maximum(_percentile(ordered, self.high), lo + self.min_range)
        scale = 255.0 / (hi - lo)
        flat = torch.round(((values.reshape(n, -1) - lo) * scale).clamp(0, 255))
        return (flat.float() / 255.0).reshape(image.shape)

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2], image.shape[-1]
        s = self.stride
        padded_h, padded_w = (h + s - 1) // s * s, (w + s - 1) // s * s
        if self.pad_mode == "constant":
            rows = torch.arange(padded_h, device=image.device)
            cols = torch.arange(padded_w, device=image.device)
            keep = ((rows < h)[:, None] & (cols < w)[None, :]).to(image.dtype)
            flag = torch.zeros((), dtype=torch.bool)
            ys = _pad_index(h, padded_h, flag).to(image.device)
            xs = _pad_index(w, padded_w, flag).to(image.device)
            return image.index_select(2, ys).index_select(3, xs) * keep
        # as inference.pad_to_stride: reflect needs the pad to be smaller than the side
        reflect = torch.tensor(self.pad_mode == "reflect") & torch.tensor(padded_h - h < h) \
            & torch.tensor(padded_w - w < w)
        ys = _pad_index(h, padded_h, reflect).to(image.device)
        xs = _pad_index(w, padded_w, reflect).to(image.device)
        return image.index_select(2, ys).index_select(3, xs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.stretch:
            image = self.stretch_contrast(image)
        h, w = image.shape[-2], image.shape[-1]
        logits = self.net(self.pad(image.float()))
        maps = torch.cat([torch.sigmoid(logits[name].float()) for name in self.heads], dim=1)
        # crop by index rather than slice: a slice's bound check is a guard torch.export cannot prove
        rows = torch.arange(h, device=maps.device)
        cols = torch.arange(w, device=maps.device)
        return maps.index_select(2, rows).index_select(3, cols)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the checkpoint to export (e.g. out/demo/checkpoint/best.pkl)")
    parser.add_argument("-o", "--output", required=True, help="TorchScript file to write (e.g. model.pt)")
    parser.add_argument("--onnx", metavar="PATH", help="also write the network as ONNX to PATH")
    parser.add_argument("--no-tuned", dest="tuned", action="store_false",
                        help="record the checkpoint's [post] values, not the tuned <checkpoint>.post.json")
    parser.add_argument("--config", help="extra settings file, read after config.ini ([post], [valid] pad_mode)")
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def _is_training_checkpoint(path: Path) -> bool:
    """A file torch.save wrote (a zip with data.pkl and no TorchScript code, or a bare pickle)."""
    try:
        if zipfile.is_zipfile(path):
            names = zipfile.ZipFile(path).namelist()
            return any(n.endswith("/data.pkl") for n in names) and not any("/code/" in n for n in names)
        with open(path, "rb") as fh:
            return fh.read(1) == b"\x80"
    except OSError:
        return False


def check_outputs(checkpoint: Path, outputs: list[Path]) -> None:
    """No output (or its .json) may land on the checkpoint, its tuned file, another checkpoint or
    a folder, and no two outputs on one file."""
    protected = {checkpoint.resolve(), tuned_path(checkpoint).resolve()}
    seen = set()
    for out in outputs:
        for path in (out, Path(f"{out}.json")):
            if path.resolve() in protected or (path.is_file() and _is_training_checkpoint(path)):
                raise InputError(f"{path}: this output would write over a checkpoint; give another path")
            if path.is_dir():
                raise InputError(f"{path}: names a folder; give a file path")
            if path.resolve() in seen:
                raise InputError(f"{path}: given twice as an output")
            seen.add(path.resolve())


def preparation_outside(pre) -> tuple[list[str], list[str]]:
    """The `[pre]` steps of `dataset.augment.prepare_image` the exported network cannot run, as
    (those before stretch, those after it). Any of them on keeps the stretch outside too, since
    the steps must run in prepare_image's order."""
    before = []
    stain = getattr(pre, "stain_norm", "off")
    if stain not in ("off", None, False):
        before.append(f"stain_norm = {stain}")
    if getattr(pre, "invert_bright", False):
        before.append("invert_bright")
    return before, (["clahe"] if pre.clahe else [])


def export_settings(path: Path, state: dict, cfg: Config, use_tuned: bool) -> dict:
    """The record stored with the exported network: what it expects, what it does, what is left to
    the caller, and the settings to predict and post-process with."""
    own = under_saved(load_config(user_path=None), state.get("config") or {}, str(path))[0]
    ours = under_saved(cfg, state.get("config") or {}, str(path))[0]
    pre, valid = own.pre, ours.valid
    post, origins = resolve_post(ours, path, use_tuned)
    model_cfg = model_config_of(state, path)
    before, after = preparation_outside(pre)
    stretch_inside = pre.stretch and not before and not after
    caller = []
    if before or after:
        steps = before + (["stretch"] if pre.stretch else []) + after
        caller.append(f"[pre] {', '.join(steps)} (dataset.augment.prepare_image, in this order) before the "
                      f"network: the input must be prepared")
    if pre.size_norm:
        caller.append(f"[pre] size_norm: rescale the image so that its median nucleus is "
                      f"{pre.nucleus_diameter:g} pixels across, predict, resize the maps back "
                      f"(inference.predict_normalised)")
    if not valid.pred_orig_size:
        caller.append(f"[valid] pred_orig_size = False: resize the image to {pre.width}x{pre.width}, "
                      f"predict, resize the maps back")
    if valid.tile_size:
        caller.append(f"[valid] tile_size = {valid.tile_size}: an image with a side longer than that is "
                      f"predicted in tiles overlapping by {valid.tile_overlap} pixels, blended "
                      f"(inference._predict_tiled), to bound memory")
    if valid.test_time_augment or valid.tta_rotate:
        views = ("flips" if valid.test_time_augment else "") + \
            (" and 90-degree rotations" if valid.tta_rotate and valid.test_time_augment else
             "90-degree rotations" if valid.tta_rotate else "")
        caller.append(f"[valid] test-time augmentation ({views}; inference.tta_views): predict each view, "
                      f"undo it on the maps, average")
    caller.append("post-processing into instances (postprocess.postprocess) with the [post] values below")
    return {
        "format": FORMAT,
        "checkpoint": {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                       "epoch": state.get("epoch"), "scores": state.get("scores") or {}},
        "model": dataclasses.asdict(model_cfg),
        "heads": list(model_cfg.heads),
        "input": {"shape": "(N, 3, H, W), any H and W", "dtype": "float32", "channels": "RGB",
                  "values": "the 8-bit image divided by 255, in [0, 1]"
                            + ("" if stretch_inside or not (before or after) else ", prepared as caller_does says")},
        "output": {"shape": "(N, K, H, W), K = len(heads)", "dtype": "float32",
                   "values": "sigmoid probabilities in [0, 1], one channel per head in the order of heads"},
        "inside": {"stretch": stretch_inside, "pad_mode": valid.pad_mode, "stride": None,
                   "sigmoid": True},
        "caller_does": caller,
        "pre": dataclasses.asdict(pre),
        "valid": dataclasses.asdict(valid),
        "post": dataclasses.asdict(post),
        "post_origin": origins,
        "config": state.get("config") or {},  # every setting the checkpoint was trained with
    }


def build_network(path: Path, state: dict) -> nn.Module:
    model = build_model(dataclasses.replace(model_config_of(state, path), pretrained=False, weights_path=None))
    load_weights(model, state, path)
    return model.eval().requires_grad_(False)  # the exported graph computes no gradients


def trace_network(model: nn.Module) -> torch.jit.ScriptModule:
    """The network traced on a stride-multiple example. Its graph has no size-dependent branch
    (the UNet's input check is Python and is left out of the trace), so it serves any
    stride-multiple size; tests check it on a size other than the example's."""
    example = torch.rand(1, 3, 2 * model.stride, 2 * model.stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation in torch 2.14
        return torch.jit.trace(model, example, strict=False, check_trace=False)


def write_torchscript(model: nn.Module, record: dict, out: Path) -> None:
    wrapper = ExportedNetwork(trace_network(model), record["heads"], model.stride,
                              record["inside"]["pad_mode"], record["inside"]["stretch"])
    text = json.dumps(record, indent=1)
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is still the format C++ (LibTorch) loads
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(wrapper)
        with atomic_path(out) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={EXTRA_FILE: text})
    with atomic_path(f"{out}.json") as tmp:
        tmp.write_text(text + "\n")


def write_onnx(model: nn.Module, record: dict, out: Path) -> None:
    """ONNX through torch's dynamo exporter (needs the onnxscript package), batch, height and
    width dynamic. The record goes into the model's metadata and beside it."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise InputError(f"--onnx needs the onnx and onnxscript packages (pip install -r requirements.txt): {exc}") from None
    wrapper = ExportedNetwork(model, record["heads"], model.stride, record["inside"]["pad_mode"],
                              record["inside"]["stretch"]).eval()
    s = model.stride
    example = torch.rand(2, 3, 3 * s - 5, 4 * s + 3)  # sizes of 1 or multiples of s would be specialised
    dim = torch.export.Dim
    shapes = {"image": {0: dim("batch", min=1, max=1024), 2: dim("height", min=2, max=65536),
                        3: dim("width", min=2, max=65536)}}
    text = json.dumps(record, indent=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=shapes,
                                    input_names=["image"], output_names=["probabilities"], verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {EXTRA_FILE: text, "heads": ",".join(record["heads"])})
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    with atomic_path(f"{out}.json") as tmp:
        tmp.write_text(text + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = Path(args.checkpoint)
    outputs = [Path(args.output)] + ([Path(args.onnx)] if args.onnx else [])
    check_outputs(path, outputs)
    cfg = load_and_report(args.config)
    state = read_checkpoint(path)
    model = build_network(path, state)
    record = export_settings(path, state, cfg, args.tuned)
    record["inside"]["stride"] = int(model.stride)
    for line in record["caller_does"]:
        print("left to the caller:", line)
    write_torchscript(model, record, Path(args.output))
    print(f"TorchScript: {args.output} (settings in {args.output}.json)")
    if args.onnx:
        write_onnx(model, record, Path(args.onnx))
        print(f"ONNX: {args.onnx} (settings in {args.onnx}.json)")
    return record


if __name__ == "__main__":
    run_main(main)
