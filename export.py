"""Export a checkpoint as a network that runs outside this repository: TorchScript, and ONNX.

    python3 export.py out/demo/checkpoint/best.pkl -o model.pt               # TorchScript
    python3 export.py best.pkl -o model.pt --onnx model.onnx                 # and ONNX
    python3 export.py best.pkl --bioimageio nuclei.zip                       # BioImage Model Zoo package

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

`--bioimageio PATH` (a .zip, or a folder) writes the same TorchScript network (and the ONNX one with
`--onnx`) as a bioimage.io model package (model spec 0.5): uint8 RGB input scaled by 1/255 in the
package's preprocessing, the heads as named output channels, test tensors from a bundled sample
image computed by `inference.predict_image`, a cover, a generated README.md and the JSON record as
an attachment; it is checked with bioimageio.spec before it is renamed into place. Checkpoints
whose input is prepared outside the network (CLAHE, stain or size normalisation) are refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch import nn

from atomic import atomic_dir, atomic_path
from config import Config, InputError, load_and_report, load_config, run_main, under_saved
from dataset.augment import stretch_contrast
from dataset.io import list_samples, read_image
from dataset.layouts import prediction_percentiles
from inference import Member, predict_image, prediction_diameters
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
    parser.add_argument("-o", "--output", help="TorchScript file to write (e.g. model.pt)")
    parser.add_argument("--onnx", metavar="PATH", help="also write the network as ONNX to PATH "
                        "(and put it in the --bioimageio package)")
    parser.add_argument("--bioimageio", metavar="PATH",
                        help="write a BioImage Model Zoo package: PATH.zip, or a folder for any other name")
    parser.add_argument("--test-image", metavar="IMAGE",
                        help="the package's test image (default: the first image of sample/stage1_train)")
    parser.add_argument("--author", action="append", metavar="NAME",
                        help=f"an author of the package (repeatable; default: {PROJECT_AUTHOR!r})")
    parser.add_argument("--license", metavar="SPDX",
                        help="the package's licence, an SPDX identifier (default: none stated; the "
                             "repository has no licence file)")
    parser.add_argument("--name", help="the package's name (default: Nuclei <model> <encoder> epoch <N>)")
    parser.add_argument("--no-tuned", dest="tuned", action="store_false",
                        help="record the checkpoint's [post] values, not the tuned <checkpoint>.post.json")
    parser.add_argument("--config", help="extra settings file, read after config.ini ([post], [valid] pad_mode)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.output or args.onnx or args.bioimageio):
        raise InputError("nothing to write: give -o FILE, --onnx FILE, --bioimageio PATH or several")
    return args


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
        across = " and ".join(f"{d:g}" for d in prediction_diameters(pre, valid))
        caller.append(f"[pre] size_norm: rescale the image so that its median nucleus is "
                      f"{across} pixels across ([pre] nucleus_diameter x [valid] diameter_scale; several: "
                      f"average the maps), predict, resize the maps back (inference.predict_normalised)")
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


def script_network(model: nn.Module, record: dict) -> torch.jit.ScriptModule:
    wrapper = ExportedNetwork(trace_network(model), record["heads"], model.stride,
                              record["inside"]["pad_mode"], record["inside"]["stretch"])
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it is still the format C++ (LibTorch) loads
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(wrapper)


def save_torchscript(scripted: torch.jit.ScriptModule, record: dict, path: Path) -> None:
    """The scripted network, with the record as the extra file `nuclei_export.json` (not atomic)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path), _extra_files={EXTRA_FILE: json.dumps(record, indent=1)})


def write_torchscript(scripted: torch.jit.ScriptModule, record: dict, out: Path) -> None:
    with atomic_path(out) as tmp:
        save_torchscript(scripted, record, tmp)
    with atomic_path(f"{out}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


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


# --- BioImage Model Zoo package ----------------------------------------------------------------

SAMPLE_DIR = Path(__file__).resolve().parent / "sample" / "stage1_train"
TEST_SIDE = 256  # the test image is cropped to at most this side, to keep the package small
PROJECT_AUTHOR = "nuclei-unet project contributors"  # no people are named in the repository
HEAD_MEANING = {"semantic": "nucleus body (foreground)", "contour": "nucleus outline",
                "marker": "nucleus centre (seed)"}
# works the architecture follows, and the data set of the bundled sample (the default test image)
CITE_UNET = ("Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28")
CITE_DCAN = ("Chen H, Qi X, Yu L, Heng PA. DCAN: Deep Contour-Aware Networks for Accurate Gland "
             "Segmentation. CVPR 2016.", "10.1109/CVPR.2016.273")
CITE_DSB = ("Caicedo JC et al. Nucleus segmentation across imaging experiments: the 2018 Data Science "
            "Bowl. Nature Methods 16, 1247-1253 (2019).", "10.1038/s41592-019-0612-7")


def _spec():
    """bioimageio.spec's model description module, or a one-line error where it is missing."""
    try:
        import bioimageio.spec  # noqa: F401  (a clear error where it is missing)
        from bioimageio.spec.model import v0_5
    except ImportError as exc:
        raise InputError(f"--bioimageio needs the bioimageio.spec package (pip install -r requirements.txt): {exc}") from None
    return v0_5


def package_blockers(pre, valid) -> list[str]:
    """Settings under which the network's input differs from the image a package consumer gives
    it, in a way the package's preprocessing cannot describe."""
    before, after = preparation_outside(pre)
    blockers = [f"[pre] {step}" for step in before + after]
    if pre.size_norm:
        blockers.append("[pre] size_norm")
    if not valid.pred_orig_size:
        blockers.append("[valid] pred_orig_size = False")
    return blockers


def check_package_output(checkpoint: Path, out: Path, others: list[Path]) -> None:
    """A zip file replaces a file (not a checkpoint); a folder replaces an earlier package folder
    (one holding rdf.yaml) or an empty one, never a folder with other files in it."""
    if out.resolve() in {p.resolve() for p in others}:
        raise InputError(f"{out}: given twice as an output")
    if out.suffix.lower() == ".zip":
        if out.is_dir():
            raise InputError(f"{out}: names a folder; a .zip package must be a file path")
        if out.resolve() in {checkpoint.resolve(), tuned_path(checkpoint).resolve()} or \
                (out.is_file() and _is_training_checkpoint(out)):
            raise InputError(f"{out}: this output would write over a checkpoint; give another path")
        return
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise InputError(f"{out}: this package folder holds the checkpoint {checkpoint}; give another folder")
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise InputError(f"{out}: not a folder; a package path without .zip is written as a folder")
        if any(out.iterdir()) and not (out / "rdf.yaml").is_file():
            raise InputError(f"{out}: folder holds files but no rdf.yaml (not an earlier package); "
                             f"give a new or empty folder")


def read_test_image(path: Path | None, dataset_cfg) -> tuple[np.ndarray, Path]:
    """The package's test image, RGB uint8 (H, W, 3) read as the checkpoint's training images were
    read, cropped to at most TEST_SIDE x TEST_SIDE; by default the first bundled sample image."""
    if path is None:
        path = list_samples(SAMPLE_DIR)[0].image_path
    elif not Path(path).is_file():
        raise InputError(f"{path}: test image not found")
    image = read_image(path, prediction_percentiles(dataset_cfg))
    return np.ascontiguousarray(image[:TEST_SIDE, :TEST_SIDE]), Path(path)


def cover_image(image: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The test image beside its maps, (H, 2W, 3) uint8: one head in grey; several as red (first),
    green (second) and blue (third) channels."""
    k = maps.shape[0]
    if k == 1:
        right = np.repeat(maps[0][:, :, None], 3, axis=2)
    else:
        right = np.zeros((*maps.shape[1:], 3), np.float32)
        right[:, :, :min(k, 3)] = np.moveaxis(maps[:3], 0, -1)
    return np.concatenate([image, np.round(right * 255).astype(np.uint8)], axis=1)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def package_readme(record: dict, name: str, test_image: Path, halo: int, license_id: str | None,
                   files: dict) -> str:
    """The package's README.md, from the checkpoint's settings."""
    heads = record["heads"]
    model, ckpt, train = record["model"], record["checkpoint"], record["config"].get("train", {})
    lines = [
        f"# {name}", "",
        f"A {model['model']} U-Net ({model['encoder']} encoder) for 2D nuclei instance segmentation, exported by "
        f"`export.py` of the nuclei-unet project from the checkpoint `{ckpt['file']}` (epoch {ckpt['epoch']}, "
        f"SHA-256 `{ckpt['sha256']}`). The network returns probability maps; turning them into nuclei "
        f"(post-processing) is not part of this package.", "",
        "## Input", "",
        "`image`: uint8, axes batch, channel, y, x; three channels, red, green, blue; any height and width "
        f"(from {record['bioimageio']['min_size']} pixels; the network pads to its stride {record['inside']['stride']} "
        f"itself, with `{record['inside']['pad_mode']}` padding, and crops the maps back). The package's "
        "preprocessing turns it to float32 and divides it by 255. A grey image is given with its value in all "
        "three channels.", "",
    ]
    normalize = record["config"].get("dataset", {}).get("normalize")
    if normalize == "percentile":
        ds = record["config"]["dataset"]
        lines.append(f"Images deeper than 8 bits are brought to 8 bits first, as the training images were read: "
                     f"the {ds['percentile_low']} to {ds['percentile_high']} percentile range stretched to 0..255 "
                     f"(`dataset/io.py`, `percentile_uint8`).")
    else:
        lines.append("Images deeper than 8 bits are brought to 8 bits first, as the training images were read: "
                     "their minimum to maximum stretched to 0..255 (`dataset/io.py`, `to_uint8`).")
    if record["inside"]["stretch"]:
        lines += ["", "Inside the network, each input (each tile, if the consumer tiles) gets the checkpoint's "
                      "contrast stretch (its 0.5 to 99.9 percentile range to the full range), as "
                      "`dataset.augment.stretch_contrast` does in training."]
    lines += [
        "", "## Output", "",
        "`probabilities`: float32 in [0, 1], axes batch, channel, y, x, the same height and width as the input; "
        "one channel per head:", "",
        *[f"- `{h}`: sigmoid probability of the {HEAD_MEANING.get(h, h)}" for h in heads], "",
        f"Tiles should overlap by {2 * halo} pixels ({halo} discarded at each side, the output's halo)."
        if halo else "No halo is declared.",
        "", "## Turning the maps into nuclei", "",
        "With the nuclei-unet repository, `postprocess.postprocess({head: map})` with these `[post]` values "
        "(where each came from: " + ", ".join(sorted(set(record["post_origin"].values()))) + "):", "",
        *[f"- `{k} = {_fmt(v)}`" for k, v in record["post"].items()], "",
        "## What the repository does and this package does not", "",
        *[f"- {line}" for line in record["caller_does"] if not line.startswith("post-processing")], "",
        "## Training", "",
        "Model settings: " + ", ".join(f"`{k} = {_fmt(v)}`" for k, v in model.items()
                                          if k not in ("pretrained", "weights_path")) + ".",
        "Training settings: " + ", ".join(f"`{k} = {_fmt(train[k])}`" for k in
                                          ("n_epoch", "n_batch", "learn_rate", "lr_schedule", "amp") if k in train)
        + ". Every setting is in the attachment `" + files["settings"] + "`.",
        "", "## Validation", "",
    ]
    scores = {k: v for k, v in (ckpt["scores"] or {}).items() if isinstance(v, (int, float))}
    if scores:
        lines.append(f"Scores the checkpoint recorded at epoch {ckpt['epoch']} on its validation images during "
                     "training: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scores.items()) + ".")
    else:
        lines.append("The checkpoint holds no validation scores.")
    lines += [
        "To score the model on unseen images with masks, use the repository: "
        f"`python3 valid.py {ckpt['file']} --dataset valid` (DSB2018 mean average precision over IoU thresholds "
        "0.5 to 0.95).", "",
        f"The test tensors (`{files['test_input']}`, `{files['test_output']}`) are the top-left "
        f"{TEST_SIDE}x{TEST_SIDE} pixels (at most) of `{test_image.name}` and the maps the repository's own "
        "inference path (`inference.predict_image`, no test-time augmentation) computes for it; "
        "`bioimageio test` reruns the packaged weights on the input and compares.", "",
        "## Licence", "",
        f"{license_id}." if license_id else
        "The nuclei-unet repository has no licence file, so no licence is stated for these weights; "
        "ask the authors before reusing or redistributing them.", "",
    ]
    return "\n".join(lines)


def package_description(v0_5, record: dict, args, files: dict, work: Path, test_image: Path,
                        n_parameters: int, halo: int, min_size: int):
    """The ModelDescr (model spec 0.5) of the package, its files under `work`."""
    heads, model, ckpt = record["heads"], record["model"], record["checkpoint"]
    train = record["config"].get("train", {})
    name = record["bioimageio"]["name"]
    space_in = [v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=v0_5.ParameterizedSize(min=min_size, step=1))
                for a in ("y", "x")]
    if halo:
        space_out = [v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId(a), halo=halo,
                                                  size=v0_5.SizeReference(tensor_id=v0_5.TensorId("image"),
                                                                          axis_id=v0_5.AxisId(a)))
                     for a in ("y", "x")]
    else:
        space_out = [v0_5.SpaceOutputAxis(id=v0_5.AxisId(a),
                                          size=v0_5.SizeReference(tensor_id=v0_5.TensorId("image"),
                                                                  axis_id=v0_5.AxisId(a)))
                     for a in ("y", "x")]
    inputs = [v0_5.InputTensorDescr(
        id=v0_5.TensorId("image"),
        description="RGB image, 8 bits",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=["red", "green", "blue"]), *space_in],
        data=v0_5.IntervalOrRatioDataDescr(type="uint8", range=(0, 255)),
        # explicit float32 at both ends: the spec appends a cast back to the data's uint8 otherwise
        preprocessing=[v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
                       v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=1 / 255, offset=0.0)),
                       v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))],
        test_tensor=v0_5.FileDescr(source=work / files["test_input"]),
        sample_tensor=v0_5.FileDescr(source=work / files["sample_input"]))]
    outputs = [v0_5.OutputTensorDescr(
        id=v0_5.TensorId("probabilities"),
        description="sigmoid probability maps, one channel per head",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=list(heads)), *space_out],
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        test_tensor=v0_5.FileDescr(source=work / files["test_output"]),
        sample_tensor=v0_5.FileDescr(source=work / files["sample_output"]))]
    torch_version = v0_5.Version(torch.__version__.split("+")[0])
    weights = {"torchscript": v0_5.TorchscriptWeightsDescr(source=work / files["torchscript"],
                                                           pytorch_version=torch_version)}
    if "onnx" in files:
        weights["onnx"] = v0_5.OnnxWeightsDescr(source=work / files["onnx"], opset_version=files["opset"],
                                                parent="torchscript",
                                                comment="exported from the same checkpoint by torch's dynamo exporter")
    cite = [CITE_UNET] + ([CITE_DCAN] if len(heads) > 1 else []) + \
        ([CITE_DSB] if files["sample_is_dsb"] else [])
    tags = ["nuclei", "instance-segmentation", "2d", "pytorch", "unet"] + \
        [t for t in ("resnet", "densenet") if model["encoder"].startswith(t)]
    bio = v0_5.BioimageioConfig(
        architecture_type="U-Net",
        architecture_description=f"{model['model']}: U-Net with the heads {', '.join(heads)}, "
                                 f"{model['encoder']} encoder, "
                                 f"{'one shared decoder' if model.get('shared_decoder') else 'a decoder per head'}",
        task="instance segmentation (probability maps; post-processing outside)",
        target_structure=["nuclei"],
        model_parameter_count=n_parameters,
        training=v0_5.TrainingDetails(
            training_epochs=ckpt["epoch"], training_batch_size=train.get("n_batch"),
            initial_learning_rate=train.get("learn_rate"), learning_rate_schedule=train.get("lr_schedule")))
    return v0_5.ModelDescr(
        name=name,
        description=(f"{model['model']} U-Net ({model['encoder']} encoder) for 2D nuclei: an RGB image in, "
                     f"probability maps of the heads {', '.join(heads)} out; the nuclei-unet repository's "
                     "post-processing turns them into instances (see README.md)."),
        authors=[v0_5.Author(name=a) for a in (args.author or [PROJECT_AUTHOR])],
        cite=[v0_5.CiteEntry(text=text, doi=v0_5.Doi(doi)) for text, doi in cite],
        license=args.license,
        tags=tags,
        documentation=v0_5.FileDescr(source=work / files["readme"]),
        covers=[v0_5.FileDescr(source=work / files["cover"])],
        attachments=[v0_5.FileDescr(source=work / files["settings"])],
        inputs=inputs, outputs=outputs,
        weights=v0_5.WeightsDescr(**weights),
        config=v0_5.Config(bioimageio=bio),
    )


def _first_error(summary) -> str:
    errors = summary.errors
    if not errors:
        return summary.status
    e = errors[0]
    return f"{'.'.join(map(str, e.loc))}: {e.msg}".replace("\n", " ")


def check_package(source: Path):
    """The written package, loaded back with bioimageio.spec (format and file checks, including the
    shapes of the test tensors); its validation summary."""
    from bioimageio.spec import load_description
    descr = load_description(source, perform_io_checks=True)
    return descr.validation_summary


def check_package_args(args) -> None:
    """--license and --name as the spec takes them, before any work."""
    v0_5 = _spec()
    if args.license is not None:
        try:
            v0_5.LicenseId(args.license)
        except ValueError:
            raise InputError(f"--license {args.license}: not an SPDX licence identifier the bioimage.io spec "
                             f"knows (e.g. MIT, BSD-3-Clause, CC-BY-4.0)") from None
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_+\- ()]{5,128}", args.name):
        raise InputError(f"--name {args.name!r}: 5 to 128 letters, digits, spaces and _+-() only")


def plan_package(model: nn.Module, scripted: torch.jit.ScriptModule, record: dict, path: Path,
                 state: dict, cfg: Config, args) -> dict:
    """Everything the package needs that can fail on the user's input (settings a package cannot
    describe, the test image), checked before any file is written: the record with the package's
    input sizes, the test image, its tensors and the halo."""
    own = under_saved(load_config(user_path=None), state.get("config") or {}, str(path))[0]
    ours = under_saved(cfg, state.get("config") or {}, str(path))[0]
    blockers = package_blockers(own.pre, ours.valid)
    if blockers:
        raise InputError(f"{path}: a BioImage Model Zoo package cannot describe {', '.join(blockers)} "
                         f"(the network's input is prepared outside it); export with -o/--onnx, whose "
                         f"JSON lists what the caller does")
    stride = record["inside"]["stride"]
    halo = ours.valid.tile_overlap // 2
    min_size = -(-(2 * halo + 1) // stride) * stride  # a tile keeps at least one pixel inside its halo
    record = {**record, "bioimageio": {"min_size": min_size, "halo": halo}}
    image, image_path = read_test_image(Path(args.test_image) if args.test_image else None, own.dataset)
    if min(image.shape[:2]) < min_size:
        raise InputError(f"{image_path}: test image is {image.shape[0]}x{image.shape[1]}, smaller than the "
                         f"package's smallest input side {min_size}; give a larger --test-image")
    # the expected output: the repository's own inference path, as valid.py runs it without TTA
    valid = dataclasses.replace(ours.valid, test_time_augment=False, tta_rotate=False, tile_size=0,
                                max_memory_mb=0)
    maps = predict_image([Member(model, own.pre)], image, valid)
    expected = np.stack([maps[h] for h in record["heads"]]).astype(np.float32)[None]
    test_input = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
    with torch.no_grad():
        got = scripted(torch.from_numpy(test_input).float() / 255).numpy()
    if np.abs(got - expected).max() > 1e-4:
        raise RuntimeError(f"the exported network's maps differ from the checkpoint's by "
                           f"{np.abs(got - expected).max():.3g} on {image_path}; not packaged")
    return {"record": record, "image": image, "image_path": image_path, "halo": halo, "min_size": min_size,
            "test_input": test_input, "expected": expected}


def write_bioimageio(model: nn.Module, scripted: torch.jit.ScriptModule, plan: dict, args,
                     onnx_path: Path | None) -> object:
    """A BioImage Model Zoo package (model spec 0.5) at `args.bioimageio`: a .zip file, or a folder
    for any other name. Built in a temporary folder, checked with bioimageio.spec, renamed into
    place. Returns the validation summary."""
    v0_5 = _spec()
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
    out = Path(args.bioimageio)
    record, image, image_path = plan["record"], plan["image"], plan["image_path"]
    halo, min_size, test_input, expected = plan["halo"], plan["min_size"], plan["test_input"], plan["expected"]
    files = {"torchscript": "weights_torchscript.pt", "test_input": "test_input.npy",
             "test_output": "test_output.npy", "sample_input": "sample_input.tif",
             "sample_output": "sample_output.tif", "cover": "cover.png", "readme": "README.md",
             "settings": EXTRA_FILE, "sample_is_dsb": args.test_image is None}
    if onnx_path is not None:
        import onnx
        files["onnx"] = "weights.onnx"
        files["opset"] = max(o.version for o in onnx.load(str(onnx_path), load_external_data=False).opset_import
                             if o.domain in ("", "ai.onnx"))
    name = args.name or f"Nuclei {record['model']['model']} {record['model']['encoder']} epoch " \
                        f"{record['checkpoint']['epoch']}"
    record["bioimageio"]["name"] = name
    with tempfile.TemporaryDirectory(prefix="nuclei-bioimageio-") as tmp:
        work = Path(tmp)
        save_torchscript(scripted, record, work / files["torchscript"])
        if onnx_path is not None:
            shutil.copyfile(onnx_path, work / files["onnx"])
        np.save(work / files["test_input"], test_input)
        np.save(work / files["test_output"], expected)
        tifffile.imwrite(work / files["sample_input"], test_input, photometric="minisblack")
        tifffile.imwrite(work / files["sample_output"], expected, photometric="minisblack")
        Image.fromarray(cover_image(image, expected[0])).save(work / files["cover"])
        (work / files["settings"]).write_text(json.dumps(record, indent=1) + "\n")
        (work / files["readme"]).write_text(package_readme(record, name, image_path, halo, args.license, files))
        n_parameters = sum(p.numel() for p in model.parameters())
        try:
            descr = package_description(v0_5, record, args, files, work, image_path, n_parameters, halo, min_size)
        except ValueError as exc:  # pydantic's ValidationError: a bad --name, --license or --author
            first = str(exc).splitlines()
            raise InputError(f"{out}: the package description is not valid: "
                             f"{' '.join(first[1:3]) if len(first) > 2 else first[0]}") from None
        if out.suffix.lower() == ".zip":
            with atomic_path(out, suffix=".zip") as target:
                target.unlink()
                save_bioimageio_package(descr, output_path=target)
                summary = check_package(target)
                if summary.status == "failed":
                    raise InputError(f"{out}: bioimageio.spec rejects the package: {_first_error(summary)}")
        else:
            with atomic_dir(out, replace=out.is_dir()) as target:
                save_bioimageio_package_as_folder(descr, output_path=target)
                summary = check_package(target / "rdf.yaml")
                if summary.status == "failed":
                    raise InputError(f"{out}: bioimageio.spec rejects the package: {_first_error(summary)}")
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = Path(args.checkpoint)
    outputs = [Path(p) for p in (args.output, args.onnx) if p]
    check_outputs(path, outputs)
    if args.bioimageio:
        check_package_output(path, Path(args.bioimageio), outputs + [Path(f"{p}.json") for p in outputs])
        check_package_args(args)  # and a missing bioimageio.spec stops here, before any work
    cfg = load_and_report(args.config)
    state = read_checkpoint(path)
    model = build_network(path, state)
    record = export_settings(path, state, cfg, args.tuned)
    record["inside"]["stride"] = int(model.stride)
    for line in record["caller_does"]:
        print("left to the caller:", line)
    scripted = script_network(model, record)
    plan = plan_package(model, scripted, record, path, state, cfg, args) if args.bioimageio else None
    if args.output:
        write_torchscript(scripted, record, Path(args.output))
        print(f"TorchScript: {args.output} (settings in {args.output}.json)")
    if args.onnx:
        write_onnx(model, record, Path(args.onnx))
        print(f"ONNX: {args.onnx} (settings in {args.onnx}.json)")
    if args.bioimageio:
        summary = write_bioimageio(model, scripted, plan, args, Path(args.onnx) if args.onnx else None)
        print(f"BioImage Model Zoo package: {args.bioimageio} (bioimageio.spec {summary.format_version}: "
              f"{summary.status}, {len(summary.warnings)} warnings)")
    return record


if __name__ == "__main__":
    run_main(main)
