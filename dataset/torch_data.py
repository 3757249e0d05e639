"""The torch side of the dataset: `NucleiDataset` (tensors with every training target) and the
group- or family-balancing sampler. Everything else in `dataset` is torch-free.

    train_samples, valid_samples = training_split(cfg)
    data = NucleiDataset(train_samples, cfg, augment=True)
    data[0] -> {'image': float32 (3, W, W) in [0, 1], 'semantic' | 'contour' | 'marker' | 'weight':
               float32 (1, W, W), 'labels': int32 (W, W), 'index': int}
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from config import Config, InputError
from dataset.augment import (PREPARE_VERSION, Augmenter, hed_jitter, item_generator, prepare_image, prepare_key,
                             prepares_nothing, to_tensor_image)
from dataset.families import family_weights, image_features, is_colour, sample_families
from dataset.io import SampleFiles, derived_cached, read_sample_cached
from dataset.selection import balance_weights, read_whitelist
from dataset.targets import make_targets


def make_sampler(samples: list[SampleFiles], cfg: Config, generator: torch.Generator | None = None):
    """A WeightedRandomSampler for `[train] balance_group` or `balance_family`, or None for plain
    shuffling. Families (`dataset.families`) are found on the decoded images (the decode cache,
    which training fills anyway), among the training samples only."""
    if cfg.train.balance_family:
        features = {s.id: image_features(read_sample_cached(s, cfg.target.fill_holes, cfg.dataset.cache_dir)[0])
                    for s in samples}
        families = sample_families(samples, features=features)
        weights = family_weights(families, [s.id for s in samples])
        return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.float64), num_samples=len(samples),
                                     replacement=True, generator=generator)
    if not cfg.train.balance_group:
        return None
    if not cfg.dataset.csv_file:
        raise InputError("[train] balance_group needs [dataset] csv_file to know the groups")
    weights = balance_weights(samples, read_whitelist(cfg.dataset.csv_file), cfg.dataset.group_column,
                              cfg.dataset.csv_file)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.float64), num_samples=len(samples),
                                 replacement=True, generator=generator)


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
        self._prepared: dict[int, np.ndarray] = {}
        self._colour: dict[int, bool] = {}

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

    def prepared(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The decoded image after `prepare_image`, and its labels. The preparation is the same every
        epoch (a haematoxylin view or a contrast stretch costs 20 ms on a usual image), so it is done
        once: kept in the disk cache beside the decoded sample, or in memory without one."""
        image, labels = self.decoded(index)
        pre = self.cfg.pre
        if prepares_nothing(pre):
            return image, labels
        cache_dir = self.cfg.dataset.cache_dir
        if cache_dir is not None:
            return derived_cached(self.samples[index], self.cfg.target.fill_holes, cache_dir,
                                  f"prepare_image v{PREPARE_VERSION} {prepare_key(pre)}", lambda: prepare_image(image, pre)), labels
        if index not in self._prepared:
            self._prepared[index] = prepare_image(image, pre)
        return self._prepared[index], labels

    def is_colour(self, index: int) -> bool:
        """Whether the decoded image is a colour one (`dataset.families.is_colour`), worked out once."""
        if index not in self._colour:
            self._colour[index] = is_colour(self.decoded(index)[0])
        return self._colour[index]

    def stain_jittered(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """`prepared`, but a colour image has its stains jittered first (`[pre] stain_jitter`): the
        jitter runs on the whole decoded image before `prepare_image`, so that a stain view
        (`[pre] stain_norm`) turns colours no training image has into grey, and its percentile
        stretch sees the whole image as at prediction. Grey images come from the cache as before."""
        image, labels = self.decoded(index)
        jittered = hed_jitter(image, self.cfg.pre.stain_jitter, rng)
        if jittered is image:  # a grey image: hed_jitter leaves it as it is
            return self.prepared(index)
        return prepare_image(jittered, self.cfg.pre), labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if self.augment:
            rng = item_generator(self.seed, self.epoch, index)
            if self.cfg.pre.stain_jitter > 0:
                image, labels = self.stain_jittered(index, rng)
            else:
                image, labels = self.prepared(index)
            if labels is None:
                raise InputError(f"{self.samples[index].folder}: training sample has no masks/ folder")
            colour = self.cfg.pre.nucleus_texture_on == "all" or self.is_colour(index)
            image, labels = self.augmenter.geometric(image, labels, rng, colour)
            tensor = self.augmenter.photometric(image, rng)
        else:
            image, labels = self.prepared(index)
            tensor = to_tensor_image(image)
        item: dict[str, torch.Tensor | int] = {"image": tensor, "index": index}
        if labels is not None:
            for name, array in make_targets(labels, self.cfg.contour, self.cfg.target).items():
                item[name] = torch.from_numpy(array)[None]
            item["labels"] = torch.from_numpy(np.ascontiguousarray(labels))
        return item
