"""Cut every sample of a DSB2018-layout folder into overlapping square tiles, in the same layout.

    python3 crop.py data/stage1_train --step 200 [--width 256] [--out data/stage1_train_crop]
                    [--csv data/v9.csv [--csv-out PATH]] [--keep-empty] [--force] [--config PATH]

Tile `<id>_<y>_<x>` is `<out>/<id>_<y>_<x>/images/<id>_<y>_<x>.png` plus `masks/<mask name>.png` for
every mask that has a pixel inside it; (y, x) is its top-left corner in the source image. Origins run
0, step, 2*step, ... while origin + width < size, plus one tile flush with the far edge. An image
narrower than width along an axis gets one tile on that axis, padded at the bottom / right: the image
with its per-channel median (its background, so no dark or bright border appears around tissue), the
masks with 0. Pixels keep their dtype and channels (read and written unchanged, in OpenCV order).
Tiles of a training image with no nucleus are dropped unless --keep-empty (kept tiles always get a
masks/ folder, possibly empty, so they still read as training samples); test images (no masks/) keep
every tile. Each tile folder also gets a `group.txt` naming its source image's group (the source's own
group.txt, else the root of its parent_id chain in --csv, else its id), so that split.py and the
training split keep all tiles of one image on the same side of the validation split. A mask with
more than one non-zero value (a label image) is refused, as in training. The output is built in
`.<name>.tmp-XXXX` next to it and renamed into place at the end (atomic.atomic_dir); the CSV likewise.
No torch here.
"""
from __future__ import annotations

import argparse
import os
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from atomic import atomic_dir, atomic_path, check_output_folders
from config import InputError, load_and_report, run_main
from dataset.io import GROUP_FILE, SampleFiles, _imread, list_samples, mask_inside
from dataset.selection import read_whitelist, sample_groups
from dataset.tiles import tile_origins


def crop_tile(array: np.ndarray, y: int, x: int, width: int, fill) -> np.ndarray:
    """array[y:y+width, x:x+width] (any dtype, (H, W) or (H, W, C)), padded to width x width.

    `fill` (a scalar, or one value per channel) fills the rows / columns beyond the array's end.
    """
    part = array[y:y + width, x:x + width]
    if part.shape[:2] == (width, width):
        return part
    tile = np.empty((width, width) + array.shape[2:], array.dtype)
    tile[...] = fill
    tile[:part.shape[0], :part.shape[1]] = part
    return tile


def median_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median of an (H, W) or (H, W, C) image, shape (1,) or (C,), in the image's dtype."""
    pixels = image.reshape(image.shape[0] * image.shape[1], -1)
    return np.round(np.median(pixels, axis=0)).astype(image.dtype)


def read_unchanged(path: Path) -> np.ndarray:
    """Read an image as stored (uint8 / uint16, (H, W) or (H, W, C)); other kinds are an InputError.

    PNG holds only 8- and 16-bit pixels with 1, 3 or 4 channels, so anything else could not be
    written back unchanged.
    """
    array = _imread(path)
    if array.dtype not in (np.uint8, np.uint16) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InputError(f"{path}: a {array.dtype} image of shape {array.shape} cannot be "
                         f"written as PNG unchanged")
    return array


def write_png(path: Path, array: np.ndarray) -> None:
    """Encode `array` (as `read_unchanged` returns) to PNG (inside the folder being built)."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path.name}")  # read_unchanged rules this out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


def tile_id(sample_id: str, y: int, x: int) -> str:
    return f"{sample_id}_{y}_{x}"


def crop_sample(files: SampleFiles, out: Path, width: int, step: int, keep_empty: bool,
                group: str) -> tuple[list[tuple[int, int]], int]:
    """Write the tiles of one sample under `out`; returns (kept tile origins (y, x), number dropped).

    Every kept tile gets `group` in its group.txt. Masks are read one at a time, so memory stays at one image plus one mask whatever their number.
    """
    image = read_unchanged(files.image_path)
    height, wide = image.shape[:2]
    origins = [(y, x) for y in tile_origins(height, width, step) for x in tile_origins(wide, width, step)]
    n_masks = dict.fromkeys(origins, 0)
    if files.mask_paths is not None:
        stems = [p.stem for p in files.mask_paths]
        if len(set(stems)) < len(stems):
            raise InputError(f"{files.folder / 'masks'}: two masks share a name, and both would be "
                             f"written as <name>.png")
    for path in files.mask_paths or ():
        mask = read_unchanged(path)
        if mask.shape[:2] != image.shape[:2]:
            raise InputError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its "
                             f"image size {wide}x{height}")
        inside = mask_inside(mask, path)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows.size == 0:
            continue  # an empty mask has a piece in no tile
        for y, x in origins:
            # the bounding box test skips most tiles of a small nucleus without scanning pixels
            if y > rows[-1] or y + width <= rows[0] or x > cols[-1] or x + width <= cols[0]:
                continue
            if inside[y:y + width, x:x + width].any():
                write_png(out / tile_id(files.id, y, x) / "masks" / f"{path.stem}.png",
                          crop_tile(mask, y, x, width, 0))
                n_masks[y, x] += 1
    kept = [o for o in origins if n_masks[o] or keep_empty or files.mask_paths is None]
    fill = median_colour(image) if min(height, wide) < width else 0
    for y, x in kept:
        name = tile_id(files.id, y, x)
        write_png(out / name / "images" / f"{name}.png", crop_tile(image, y, x, width, fill))
        if files.mask_paths is not None:
            (out / name / "masks").mkdir(exist_ok=True)
        (out / name / GROUP_FILE).write_text(group + "\n", encoding="utf-8")
    return kept, len(origins) - len(kept)


def crop_rows(table: pd.DataFrame, sample_id: str, kept: list[tuple[int, int]], width: int) -> list[dict]:
    """One CSV row per tile: the parent's row (if `table`, indexed by image_id, has it) re-labelled."""
    base = table.loc[sample_id].to_dict() if sample_id in table.index else {}
    # text like the rest of the table: numbers next to the empty cells of other rows turn to floats
    return [{**base, "image_id": tile_id(sample_id, y, x), "parent_id": sample_id, "y": str(y),
             "x": str(x), "width": str(width)} for y, x in kept]


def crop_dataset(source: str | os.PathLike, out: str | os.PathLike, width: int, step: int,
                 keep_empty: bool = False, force: bool = False, csv_path: str | os.PathLike | None = None,
                 csv_out: str | os.PathLike | None = None) -> tuple[int, int]:
    """Tile every sample of `source` into `out`; returns (tiles written, tiles dropped as empty).

    With `csv_path`, its rows plus one row per tile (see `crop_rows`) are written to `csv_out`
    (default: `csv_path` itself), replacing earlier rows of the same tile ids. Bad input: InputError
    and nothing written; with `force` an existing `out` is removed only once the new one is complete.
    """
    source, out = Path(source), Path(out)
    if width < 1 or step < 1:
        raise InputError(f"--width {width} and --step {step} must be at least 1")
    check_output_folders(source, [out], force)
    samples = list_samples(source)
    table = read_whitelist(csv_path) if csv_path is not None else None
    csv_out = Path(csv_out if csv_out is not None else csv_path) if table is not None else None
    groups = sample_groups(samples, table, csv_path)

    rows: list[dict] = []
    n_written = n_dropped = 0
    try:
        with ExitStack() as stack:
            # entered CSV first, so on the way out the tiles are renamed into place before the CSV
            csv_part = stack.enter_context(atomic_path(csv_out)) if csv_out is not None else None
            building = stack.enter_context(atomic_dir(out, replace=force))
            for files in samples:
                kept, dropped = crop_sample(files, building, width, step, keep_empty, groups[files.id])
                n_written += len(kept)
                n_dropped += dropped
                if table is not None:
                    rows.extend(crop_rows(table, files.id, kept, width))
            if csv_part is not None:
                merged = pd.concat([table.reset_index(), pd.DataFrame(rows)], ignore_index=True)
                merged.drop_duplicates("image_id", keep="last").to_csv(csv_part, index=False)
    except OSError as exc:  # unwritable or full output folder: the user's to fix
        raise InputError(f"{exc.filename or out}: cannot write ({exc.strerror or exc})") from None
    if csv_out is not None:
        print(f"CSV {csv_out}: {len(rows)} tile rows written")
    return n_written, n_dropped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="DSB2018-layout folder, e.g. data/stage1_train")
    parser.add_argument("--step", type=int, required=True, help="distance between tile origins (pixels)")
    parser.add_argument("--width", type=int, help="tile side in pixels (default: [pre] width)")
    parser.add_argument("--out", help="output folder (default: <source>_crop next to the source)")
    parser.add_argument("--csv", help="metadata CSV with an image_id column; one row is added per tile")
    parser.add_argument("--csv-out", help="where the CSV with the tile rows goes (default: --csv itself)")
    parser.add_argument("--keep-empty", action="store_true", help="keep tiles without any nucleus")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    args = parser.parse_args(argv)

    cfg = load_and_report(args.config)
    if args.csv_out and not args.csv:
        raise InputError("--csv-out needs --csv")
    source = Path(args.source)
    out = Path(args.out) if args.out else source.resolve().parent / f"{source.resolve().name}_crop"
    width = cfg.pre.width if args.width is None else args.width
    n_written, n_dropped = crop_dataset(source, out, width, args.step, args.keep_empty, args.force,
                                        args.csv, args.csv_out)
    print(f"cropped {source} into {out} (width {width}, step {args.step}): "
          f"{n_written} tiles written, {n_dropped} dropped without a nucleus")


if __name__ == "__main__":
    run_main(main)
