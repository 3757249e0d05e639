"""Look at what the network will be fed: dataset summary, split, and augmented samples with targets.

    python3 preview.py sample/stage1_train --out out/preview
    python3 preview.py data/train --n 6 --config my.ini

Prints the number of images, sizes, nuclei per image and the validation split that `train.py`
would use (whole groups, see `dataset.sample_groups`), then writes `preview.png`: for a few
training samples, the image, the instance labels and the semantic, contour, marker and weight
targets after the `[pre]` preprocessing and geometric augmentation (crop, rescale, elastic, flips,
rotations) that training draws for them in its first epoch.

No torch here, so it starts in a moment: the colour augmentation (torchvision's jitter, channel
shuffle, grayscale, inversion) and `[pre] noise` are not drawn; the images show the colours the
network gets before those random changes.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from atomic import atomic_path
from config import Config, load_and_report, run_main
from dataset.augment import Augmenter, hed_jitter, item_generator, prepare_image
from dataset.families import is_colour
from dataset.io import read_sample_cached
from dataset.layouts import layout_samples
from dataset.selection import read_whitelist, sample_groups, split_ids
from dataset.targets import make_targets

PANELS = ("image", "labels", "semantic", "contour", "marker", "weight")


def summarize(samples, cfg) -> list[str]:
    sizes, counts = Counter(), []
    for files in samples:
        image, labels = read_sample_cached(files, cfg.target.fill_holes, cfg.dataset.cache_dir)
        sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        if labels is not None:
            counts.append(len(np.unique(labels)) - 1)
    lines = [f"{len(samples)} images; sizes (WxH): " + ", ".join(f"{s} ({n})" for s, n in sizes.most_common())]
    if counts:
        lines.append(f"nuclei per labelled image: min {min(counts)}, median {int(np.median(counts))}, "
                     f"max {max(counts)}, total {sum(counts)}")
    csv_file = cfg.dataset.csv_file
    groups = sample_groups(samples, read_whitelist(csv_file) if csv_file else None, csv_file)
    train, valid = split_ids([s.id for s in samples], cfg.dataset.cv_ratio, cfg.dataset.split_seed, groups)
    lines.append(f"validation split at cv_ratio {cfg.dataset.cv_ratio}, seed {cfg.dataset.split_seed}, "
                 f"{len(set(groups.values()))} groups: {len(train)} train, {len(valid)} valid")
    return lines


def augmented_items(samples, cfg: Config, n: int) -> list[dict[str, np.ndarray]]:
    """`n` training items (cycling through `samples`) as numpy arrays: 'image' RGB uint8, 'labels'
    and the targets, with the stain and geometric draws `NucleiDataset` makes for them at epoch 0."""
    augmenter = Augmenter(cfg.pre)
    items = []
    for index in range(n):
        files = samples[index % len(samples)]
        image, labels = read_sample_cached(files, cfg.target.fill_holes, cfg.dataset.cache_dir)
        rng = item_generator(cfg.train.seed, 0, index % len(samples))
        colour = is_colour(image)
        if cfg.pre.stain_jitter > 0:  # before the view, as in NucleiDataset.stain_jittered
            image = hed_jitter(image, cfg.pre.stain_jitter, rng)
        image, labels = augmenter.geometric(prepare_image(image, cfg.pre), labels, rng, colour)
        items.append({"image": image, "labels": labels, **make_targets(labels, cfg.contour, cfg.target)})
    return items


def draw(items: list[dict], path: Path) -> None:
    """Write a grid (one row per sample, one column per panel) to `path`, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb

    fig, axes = plt.subplots(len(items), len(PANELS), figsize=(2.2 * len(PANELS), 2.2 * len(items)),
                             squeeze=False)
    for row, item in zip(axes, items):
        for ax, name in zip(row, PANELS):
            if name == "image":
                ax.imshow(item["image"])
            elif name == "labels":
                ax.imshow(label2rgb(item["labels"], bg_label=0))
            else:
                ax.imshow(item[name], cmap="magma" if name == "weight" else "gray")
            ax.set_axis_off()
            if ax is axes[0][PANELS.index(name)]:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default="sample/stage1_train",
                        help="dataset folder in any layout of [dataset] layout (docs/datasets.md)")
    parser.add_argument("--out", default="out/preview", help="folder for preview.png")
    parser.add_argument("--n", type=int, default=4, help="number of augmented samples to draw")
    parser.add_argument("--config", help="extra settings file, read after config.ini")
    args = parser.parse_args(argv)
    cfg = load_and_report(args.config)

    samples = layout_samples(args.root, cfg.dataset)
    for line in summarize(samples, cfg):
        print(line)
    labelled = [s for s in samples if s.mask_paths is not None]
    if labelled:
        items = augmented_items(labelled, cfg, args.n)
        for name in ("contour", "marker"):
            share = np.mean([float(item[name].mean()) for item in items])
            print(f"{name} target covers {100 * share:.1f}% of the pixels of an augmented {cfg.pre.width}px crop")
        out = Path(args.out) / "preview.png"
        draw(items, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
