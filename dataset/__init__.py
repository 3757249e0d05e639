"""The nuclei dataset: sample selection (CSV whitelist, validation split), decoding, targets, batches.

    train_samples, valid_samples = training_split(cfg)
    data = NucleiDataset(train_samples, cfg, augment=True)
    data[0] -> {'image': float32 (3, W, W) in [0, 1], 'semantic' | 'contour' | 'marker' | 'weight':
               float32 (1, W, W), 'labels': int32 (W, W), 'index': int}
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from config import Config, DatasetConfig, InputError
from dataset.augment import Augmenter, prepare_image, to_tensor_image
from dataset.io import SampleFiles, list_samples, read_sample_cached
from dataset.targets import make_targets

__all__ = ["NucleiDataset", "training_split", "split_ids", "read_whitelist", "apply_whitelist",
           "balance_weights", "list_samples", "SampleFiles"]

FILTER_COLUMNS = ("source", "major_category", "sub_category")


def split_ids(ids: list[str], cv_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of sample ids into (train, valid), both sorted.

    The result depends only on the set of ids, the ratio and the seed. With a positive ratio and
    at least two ids, each side gets at least one.
    """
    ids = sorted(ids)
    n_valid = int(round(len(ids) * cv_ratio))
    if cv_ratio > 0 and len(ids) >= 2:
        n_valid = min(max(n_valid, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    valid = {ids[i] for i in order[:n_valid]}
    return [i for i in ids if i not in valid], [i for i in ids if i in valid]


def read_whitelist(path: str | os.PathLike) -> pd.DataFrame:
    """The CSV whitelist, indexed by image_id. Unreadable file or missing column: InputError."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: CSV file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: unreadable CSV ({str(exc).splitlines()[0]})") from None
    if "image_id" not in table.columns:
        raise InputError(f"{path}: CSV has no image_id column (columns: {', '.join(table.columns)})")
    return table.drop_duplicates("image_id").set_index("image_id")


def apply_whitelist(samples: list[SampleFiles], cfg: DatasetConfig,
                    table: pd.DataFrame | None) -> list[SampleFiles]:
    """Keep the samples whose CSV row matches every non-empty filter of `[dataset]`."""
    if table is None:
        return samples
    keep = table
    for column in FILTER_COLUMNS:
        wanted = getattr(cfg, column)
        if not wanted:
            continue
        if column not in table.columns:
            raise InputError(f"{cfg.csv_file}: [dataset] {column} filters on a column the CSV lacks")
        keep = keep[keep[column].isin(wanted)]
    return [s for s in samples if s.id in keep.index]


def balance_weights(samples: list[SampleFiles], table: pd.DataFrame, column: str,
                    csv_path: str) -> torch.Tensor:
    """Sampling weights (float64, one per sample) that draw every group equally often."""
    if column not in table.columns:
        raise InputError(f"{csv_path}: [dataset] group_column {column!r} is not a CSV column")
    groups = [table.at[s.id, column] if s.id in table.index else "" for s in samples]
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return torch.as_tensor(1.0 / counts[inverse], dtype=torch.float64)


def training_split(cfg: Config) -> tuple[list[SampleFiles], list[SampleFiles]]:
    """(train, valid) samples: root/train and root/valid, or a seeded cv_ratio split of root/train."""
    data = cfg.dataset
    root = Path(data.root)
    table = read_whitelist(data.csv_file) if data.csv_file else None
    train = apply_whitelist(list_samples(root / "train"), data, table)
    if not train:
        raise InputError(f"{root / 'train'}: no sample is left after the CSV whitelist {data.csv_file}")
    if (root / "valid").is_dir():
        return train, apply_whitelist(list_samples(root / "valid"), data, table)
    train_ids, valid_ids = split_ids([s.id for s in train], data.cv_ratio, data.split_seed)
    chosen = set(valid_ids)
    return [s for s in train if s.id not in chosen], [s for s in train if s.id in chosen]


def make_sampler(samples: list[SampleFiles], cfg: Config, generator: torch.Generator | None = None):
    """A WeightedRandomSampler for `[train] balance_group`, or None for plain shuffling."""
    if not cfg.train.balance_group:
        return None
    if not cfg.dataset.csv_file:
        raise InputError("[train] balance_group needs [dataset] csv_file to know the groups")
    weights = balance_weights(samples, read_whitelist(cfg.dataset.csv_file), cfg.dataset.group_column,
                              cfg.dataset.csv_file)
    return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)


class NucleiDataset(Dataset):
    """Samples as tensors with every training target.

    augment=True: random `[pre]` augmentation and a width x width crop; the random state of item i
    at epoch e is seeded from (seed, e, i), so runs repeat exactly with any number of workers.
    augment=False: the whole image, deterministic (for validation).
    Test samples (no masks) carry only 'image' and 'index'.
    """

    def __init__(self, samples: list[SampleFiles], cfg: Config, augment: bool, seed: int | None = None):
        self.samples = list(samples)
        self.cfg = cfg
        self.augment = augment
        self.augmenter = Augmenter(cfg.pre) if augment else None
        self.seed = cfg.train.seed if seed is None else seed
        self.epoch = 0
        self._memory: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (call before each epoch; workers see it when re-created)."""
        self.epoch = epoch

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 image and int32 labels (or None), decoded once and then served from the cache."""
        cache_dir = self.cfg.dataset.cache_dir
        if cache_dir is not None:
            return read_sample_cached(self.samples[index], self.cfg.target.fill_holes, cache_dir)
        if index not in self._memory:
            self._memory[index] = read_sample_cached(self.samples[index], self.cfg.target.fill_holes, None)
        return self._memory[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image, labels = self.decoded(index)
        image = prepare_image(image, self.cfg.pre)
        if self.augment:
            if labels is None:
                raise InputError(f"{self.samples[index].folder}: training sample has no masks/ folder")
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, labels = self.augmenter.geometric(image, labels, rng)
            tensor = self.augmenter.photometric(image, rng)
        else:
            tensor = to_tensor_image(image)
        item: dict[str, torch.Tensor | int] = {"image": tensor, "index": index}
        if labels is not None:
            for name, array in make_targets(labels, self.cfg.contour, self.cfg.target).items():
                item[name] = torch.from_numpy(array)[None]
            item["labels"] = torch.from_numpy(np.ascontiguousarray(labels))
        return item
