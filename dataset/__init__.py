"""The nuclei dataset: sample selection (CSV whitelist, groups, validation split), decoding,
targets, batches.

    from dataset import NucleiDataset, make_sampler, training_split, split_ids

Importing the package does not import torch: the readers (`dataset.io`), the selection
(`dataset.selection`), the targets, the tile positions and the augmentation geometry are torch-free,
and `NucleiDataset` / `make_sampler` (in `dataset.torch_data`) are loaded on first access.
"""
from __future__ import annotations

from dataset.io import SampleFiles, list_samples
from dataset.selection import (apply_whitelist, balance_weights, read_whitelist, sample_groups, split_ids,
                               training_split)

__all__ = ["NucleiDataset", "make_sampler", "training_split", "split_ids", "sample_groups", "read_whitelist",
           "apply_whitelist", "balance_weights", "list_samples", "SampleFiles"]

_TORCH_NAMES = ("NucleiDataset", "make_sampler")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from dataset import torch_data
        return getattr(torch_data, name)
    raise AttributeError(f"module 'dataset' has no attribute {name!r}")
