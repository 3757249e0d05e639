"""The Dataset on the bundled sample: tensors, reproducibility, workers, whitelist and split."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import InputError
from dataset import (NucleiDataset, apply_whitelist, balance_weights, list_samples, make_sampler,
                     read_whitelist, sample_groups, split_ids, training_split)
from tests.conftest import SAMPLE, disk, make_sample


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


@pytest.mark.parametrize("cached", [True, False])
def test_prepared_images_are_made_once_and_equal_a_fresh_preparation(cfg, tmp_path, monkeypatch, cached):
    from dataset import augment, torch_data
    cfg = small(cfg).replace("pre", stain_norm="hematoxylin", stretch=True)
    if not cached:
        cfg = cfg.replace("dataset", cache_dir=None)
    calls = []
    real = augment.prepare_image
    monkeypatch.setattr(torch_data, "prepare_image", lambda image, pre: calls.append(1) or real(image, pre))
    samples = list_samples(SAMPLE)
    first = NucleiDataset(samples, cfg, augment=True)
    items = [first[i]["image"] for i in range(len(samples))]
    assert len(calls) == len(samples)
    data = first if not cached else NucleiDataset(samples, cfg, augment=True)  # a new run reads the disk cache
    again = [data[i]["image"] for i in range(len(samples))]
    assert len(calls) == len(samples) and all(torch.equal(a, b) for a, b in zip(items, again))
    for i, sample in enumerate(samples):
        image, _ = data.decoded(i)
        assert np.array_equal(data.prepared(i)[0], real(image, cfg.pre))
    # other [pre] preparation settings are other entries
    NucleiDataset(samples, cfg.replace("pre", stretch=False), augment=True)[0]
    assert len(calls) == len(samples) + 1


def test_texture_on_colour_leaves_the_grey_samples_as_without_it(cfg):
    samples = list_samples(SAMPLE)
    base = small(cfg).replace("pre", nucleus_texture=1.0)
    items = {on: NucleiDataset(samples, base.replace("pre", nucleus_texture_on=on), augment=True)
             for on in ("all", "colour")}
    # the texture's coin is tossed for every crop: a chance that never comes up draws the same numbers
    plain = NucleiDataset(samples, base.replace("pre", nucleus_texture=1e-12), augment=True)
    colour = [items["colour"].is_colour(i) for i in range(len(samples))]
    assert any(colour) and not all(colour)  # the sample has both kinds
    for index, is_colour in enumerate(colour):
        textured = items["all"][index]["image"]
        assert torch.equal(items["colour"][index]["image"], textured if is_colour else plain[index]["image"])


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


def test_one_sample_per_group_gives_the_split_of_earlier_versions():
    ids = [f"id{i:02d}" for i in range(20)]
    assert split_ids(ids, 0.25, seed=1)[1] == ["id01", "id07", "id10", "id16", "id18"]  # as before groups
    assert split_ids(ids, 0.25, 1, {i: i for i in ids}) == split_ids(ids, 0.25, 1)


@pytest.mark.parametrize("seed", range(8))
def test_split_ids_moves_whole_groups_and_repeats(seed):
    ids = [f"t{i:02d}" for i in range(30)]
    groups = {i: f"image{int(i[1:]) // 3}" for i in ids}  # ten images, three tiles each
    train, valid = split_ids(ids, 0.2, seed, groups)
    assert len(valid) == 6 and sorted(train + valid) == ids
    assert not {groups[i] for i in train} & {groups[i] for i in valid}
    shuffled = dict(reversed(groups.items()))
    assert split_ids(list(reversed(ids)), 0.2, seed, shuffled) == (train, valid)


def test_split_ids_with_uneven_groups():
    ids = [f"a{i:02d}" for i in range(50)] + [f"b{i}" for i in range(10)]
    groups = {i: "big" for i in ids if i.startswith("a")}  # the b's are not named: one group each
    for seed in range(5):
        train, valid = split_ids(ids, 0.1, seed, groups)
        assert len(valid) == 6 and all(i.startswith("b") for i in valid)  # the big group overshoots
    last = ids[40:]
    two = {i: i[0] for i in last}  # two groups of ten, a target of two samples
    train, valid = split_ids(last, 0.1, 0, two)
    assert len(train) == len(valid) == 10 and len({two[i] for i in valid}) == 1  # each side gets a group
    assert split_ids(last, 0.5, 0, {i: "one" for i in ids})[1] == []  # one group cannot be split


def test_sample_groups_group_file_then_csv_parent_chain_then_own_id(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "a_0_0", "b_0_0", "b_0_0_0_0", "c"):
        make_sample(root, name, np.zeros((8, 8), np.uint8), [disk((8, 8), (4, 4), 2)])
    (root / "a_0_0" / "group.txt").write_text("movie1\n")
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id,parent_id\na_0_0,a\nb_0_0,b\nb_0_0_0_0,b_0_0\nb,movie2\nc,\n")
    samples = list_samples(root)
    assert sample_groups(samples, read_whitelist(csv), csv) == {
        "a": "a", "a_0_0": "movie1", "b_0_0": "movie2", "b_0_0_0_0": "movie2", "c": "c"}
    assert sample_groups(samples) == {"a": "a", "a_0_0": "movie1", "b_0_0": "b_0_0",
                                      "b_0_0_0_0": "b_0_0_0_0", "c": "c"}
    csv.write_text("image_id,parent_id\nb_0_0,b\nb,b_0_0\n")
    with pytest.raises(InputError, match="meta.csv: the parent_id chain of b_0_0 loops"):
        sample_groups(samples, read_whitelist(csv), csv)


@pytest.mark.parametrize("seed", range(4))
def test_training_split_keeps_the_tiles_of_one_image_on_one_side(tmp_path, cfg, seed):
    import crop
    source = tmp_path / "src"
    for i in range(4):
        make_sample(source, f"img{i}", np.full((64, 64), 40 * i, np.uint8),
                    [disk((64, 64), (y, x), 5) for y in (16, 48) for x in (16, 48)])
    crop.crop_dataset(source, tmp_path / "data" / "train", 32, 32)
    train, valid = training_split(cfg.replace("dataset", root=str(tmp_path / "data"), cv_ratio=0.25,
                                              split_seed=seed))
    parent = {s.id: s.id.split("_")[0] for s in train + valid}
    assert len(train) == 12 and len(valid) == 4
    assert len({parent[s.id] for s in valid}) == 1 and not {parent[s.id] for s in train} & {parent[s.id] for s in valid}


def test_a_valid_folder_that_shares_an_image_or_a_tile_group_with_train_is_refused(tmp_path, cfg):
    import shutil

    import crop
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "train")
    make_sample(data / "valid", "fresh", np.full((64, 64), 90, np.uint8), [disk((64, 64), (32, 32), 6)])
    c = cfg.replace("dataset", root=str(data))
    train, valid = training_split(c)
    assert len(train) == 8 and [s.id for s in valid] == ["fresh"]
    # a training image copied into valid/ under another name
    first = sorted((data / "train").iterdir())[0]
    shutil.copytree(first, data / "valid" / "renamed")
    (data / "valid" / "renamed" / "images" / f"{first.name}.png").rename(
        data / "valid" / "renamed" / "images" / "renamed.png")
    with pytest.raises(InputError, match=rf"valid: validation image renamed.png \(renamed\) is also a training "
                                         rf"image \(.*{first.name}.png"):
        training_split(c)
    shutil.rmtree(data / "valid" / "renamed")
    # crop.py tiles of one image on both sides
    source = tmp_path / "src"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)  # tiles unlike each other
    make_sample(source, "big", noise, [disk((64, 64), (y, 16), 5) for y in (16, 48)])
    crop.crop_dataset(source, tmp_path / "tiles", 32, 32)
    tiles = sorted((tmp_path / "tiles").iterdir())
    shutil.copytree(tiles[0], data / "train" / tiles[0].name)
    shutil.copytree(tiles[-1], data / "valid" / tiles[-1].name)
    with pytest.raises(InputError, match=r"are tiles of one image \(group big in their group.txt\)"):
        training_split(c)


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
