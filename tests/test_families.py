"""Image families (dataset/families.py), family-balanced sampling and the leave-one-family-out benchmark."""
import sys
from collections import Counter

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from config import load_config
from dataset.families import (FAMILIES, family_weights, image_family, image_features, merge_small, sample_families)
from dataset.io import list_samples
from tests.conftest import REPO, disk, make_sample


def synthetic(family: str, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image of the given family, with a few round nuclei."""
    rng = np.random.default_rng(seed)
    size = {"fluorescence_small": (64, 64), "fluorescence_medium": (360, 360),
            "fluorescence_large": (520, 696)}.get(family, (64, 80))
    background, nucleus = {"brightfield": ((225,) * 3, (90,) * 3), "colour_tinted": ((180, 160, 205), (90, 40, 150)),
                           "colour_white": ((235, 232, 238), (140, 40, 140))}.get(family, ((8,) * 3, (150,) * 3))
    image = np.empty((*size, 3), np.uint8)
    image[:] = background
    for _ in range(3):
        centre = (int(rng.integers(10, size[0] - 10)), int(rng.integers(10, size[1] - 10)))
        image[disk(size, centre, 6)] = nucleus
    if family.startswith("colour"):  # stained images are never flat
        image = np.clip(image.astype(int) + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)
    return image


@pytest.mark.parametrize("family", FAMILIES)
def test_the_rule_on_synthetic_images(family):
    assert image_family(synthetic(family)) == family


def test_features_of_grey_and_colour_images():
    grey = image_features(synthetic("fluorescence_small"))
    assert grey["colour"] == 0 and grey["chroma"] == 0 and grey["area"] == 64 * 64 and grey["median"] == 8
    colour = image_features(synthetic("colour_tinted"))
    assert colour["colour"] == 1 and colour["tint"] > 32
    with pytest.raises(ValueError, match="RGB"):
        image_features(np.zeros((8, 8), np.uint8))


def test_small_families_merge_into_the_nearest():
    names = {f"f{i}": "fluorescence_small" for i in range(12)}
    names.update({f"b{i}": "brightfield" for i in range(12)})
    names.update({"w0": "colour_white", "w1": "colour_white"})
    features = {i: image_features(synthetic(names[i], seed=k)) for k, i in enumerate(names)}
    # two white-background colour images: nearer the bright grey family than the dark fluorescence one
    merged = merge_small(names, features, 10)
    assert Counter(merged.values()) == {"fluorescence_small": 12, "brightfield": 14}
    assert merge_small(names, features, 10) == merged  # deterministic
    assert merge_small(names, features, 2) == names  # nothing to merge
    assert set(merge_small(names, features, 100).values()) == {"brightfield"}  # one family is left


def test_weights_draw_every_family_equally():
    families = {"a": "x", "b": "x", "c": "x", "d": "y"}
    weights = family_weights(families, ["a", "b", "c", "d"])
    assert weights.dtype == np.float64 and np.allclose(weights, [1 / 3, 1 / 3, 1 / 3, 1.0])


@pytest.fixture
def two_family_folder(tmp_path):
    """30 grey fluorescence and 10 tinted colour samples, 48x48."""
    root = tmp_path / "data" / "train"
    for k in range(40):
        family = "colour_tinted" if k % 4 == 0 else "fluorescence_small"
        image = synthetic(family, seed=k)[:48, :48]
        make_sample(root, f"s{k:02d}-{family}", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [disk((48, 48), (24, 24), 6)])
    return root


def test_balanced_sampling_draws_families_equally_often(two_family_folder):
    from dataset.torch_data import make_sampler
    samples = list_samples(two_family_folder)
    families = sample_families(samples)
    assert Counter(families.values()) == {"fluorescence_small": 30, "colour_tinted": 10}
    cfg = load_config(user_path=None).replace("dataset", cache_dir=None).replace("train", balance_family=True)
    sampler = make_sampler(samples, cfg, torch.Generator().manual_seed(0))
    draws = [families[samples[i].id] for _ in range(50) for i in sampler]
    share = Counter(draws)["colour_tinted"] / len(draws)
    assert len(draws) == 50 * 40 and abs(share - 0.5) < 0.03  # unbalanced it would be 0.25
    assert make_sampler(samples, cfg.replace("train", balance_family=False)) is None


def test_leave_one_family_out_rows(two_family_folder, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    import accuracy
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(two_family_folder), "--work", "work", "--results", "rows.csv", "--tune-images", "4",
              "--classical"]
    rows = accuracy.main([*common, "--leave-one-out"])
    assert [r["family"] for r in rows] == ["fluorescence_small", "colour_tinted"]
    assert [r["n_valid"] for r in rows] == [30, 10] and [r["n_train"] for r in rows] == [6, 26]
    table = pd.read_csv("rows.csv")
    assert list(table["protocol"]) == ["leave one family out"] * 2
    # the held-out family is the whole validation split and is neither trained nor tuned on
    data = tmp_path / "work" / "classical-colour_tinted" / "data"
    valid, train, tune = ({p.name for p in (data / part).iterdir()} for part in ("valid", "train", "tune"))
    assert valid == {f"s{k:02d}-colour_tinted" for k in range(0, 40, 4)}
    assert not valid & (train | tune) and len(tune) == 4
    one = accuracy.main([*common, "--hold-out-family", "colour_tinted"])
    assert one["dsb"] == pytest.approx(rows[1]["dsb"])
    with pytest.raises(SystemExit, match="brightfield is not a family.*colour_tinted \\(10\\)"):
        accuracy.main([*common, "--hold-out-family", "brightfield"])
    plain = accuracy.main(common)
    assert plain["protocol"] == "random 10 %" and plain["family"] == "" and plain["n_valid"] == 4
