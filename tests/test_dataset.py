"""The Dataset on the bundled sample: tensors, reproducibility, workers, whitelist and split."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import InputError
from dataset import (NucleiDataset, apply_whitelist, balance_weights, list_samples, make_sampler,
                     read_whitelist, split_ids, training_split)
from tests.conftest import SAMPLE


def small(cfg):
    return cfg.replace("pre", width=64)


def test_items_have_every_target(cfg):
    data = NucleiDataset(list_samples(SAMPLE), small(cfg), augment=True)
    item = data[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    for name in ("semantic", "contour", "marker", "weight"):
        assert item[name].shape == (1, 64, 64) and item[name].dtype == torch.float32
    assert item["labels"].shape == (64, 64) and item["labels"].dtype == torch.int32
    assert torch.equal(item["semantic"][0] > 0, item["labels"] > 0)


def test_augmentation_repeats_per_epoch_and_changes_between(cfg):
    data = NucleiDataset(list_samples(SAMPLE), small(cfg), augment=True)
    a = data[2]["image"]
    assert torch.equal(a, data[2]["image"])
    data.set_epoch(1)
    assert not torch.equal(a, data[2]["image"])


def test_workers_give_the_same_batches_as_the_main_process(cfg):
    data = NucleiDataset(list_samples(SAMPLE), small(cfg), augment=True)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=4, shuffle=False, num_workers=workers)
        batches.append([b["image"] for b in loader])
    assert all(torch.equal(x, y) for x, y in zip(*batches))


def test_eval_items_are_whole_images(cfg):
    data = NucleiDataset(list_samples(SAMPLE), cfg, augment=False)
    sizes = {tuple(data[i]["image"].shape[1:]) for i in range(len(data))}
    assert sizes == {(256, 256), (256, 320), (360, 360)}
    assert torch.equal(data[0]["image"], data[0]["image"])


def test_split_ids_is_seeded_and_complete():
    ids = [f"id{i:02d}" for i in range(20)]
    train, valid = split_ids(ids, 0.25, seed=1)
    assert len(valid) == 5 and sorted(train + valid) == ids
    assert split_ids(list(reversed(ids)), 0.25, seed=1) == (train, valid)
    assert split_ids(ids, 0.25, seed=2) != (train, valid)
    assert split_ids(ids[:2], 0.01, seed=0)[1] and split_ids(ids, 0.0, seed=0)[1] == []


def test_training_split_without_valid_folder(tmp_path, cfg):
    (tmp_path / "train").symlink_to(SAMPLE)
    c = cfg.replace("dataset", root=str(tmp_path), cv_ratio=0.25)
    train, valid = training_split(c)
    assert len(train) == 6 and len(valid) == 2
    assert not {s.id for s in train} & {s.id for s in valid}


def write_csv(path, ids):
    rows = ["image_id,source,major_category"]
    rows += [f"{sid},{'Kaggle' if i < 5 else 'TCGA'},{'fluo' if i < 6 else 'tissue'}" for i, sid in enumerate(ids)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_whitelist_and_balance(tmp_path, cfg):
    samples = list_samples(SAMPLE)
    csv = write_csv(tmp_path / "v.csv", [s.id for s in samples])
    table = read_whitelist(csv)
    c = cfg.replace("dataset", csv_file=str(csv), source=("TCGA",))
    kept = apply_whitelist(samples, c.dataset, table)
    assert [s.id for s in kept] == [s.id for s in samples[5:]]
    weights = balance_weights(samples, table, "major_category", str(csv))
    assert weights[:6].sum().item() == pytest.approx(1.0) and weights[6:].sum().item() == pytest.approx(1.0)
    c2 = cfg.replace("dataset", csv_file=str(csv)).replace("train", balance_group=True)
    sampler = make_sampler(samples, c2, torch.Generator().manual_seed(0))
    drawn = [samples[i].id for i in sampler]
    assert len(drawn) == len(samples)


def test_bad_csv(tmp_path, cfg):
    missing = tmp_path / "none.csv"
    with pytest.raises(InputError, match="none.csv: CSV file not found"):
        read_whitelist(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,source\na,b\n")
    with pytest.raises(InputError, match="bad.csv: CSV has no image_id column"):
        read_whitelist(bad)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x00garbage")
    with pytest.raises(InputError, match="bin.csv"):
        read_whitelist(binary)
    with pytest.raises(InputError, match="balance_group needs"):
        make_sampler(list_samples(SAMPLE), cfg.replace("train", balance_group=True))
