"""Nucleus sizes: exact median diameters from labels, and the estimate from a semantic map that
size normalisation relies on at prediction (dataset/sizes.py)."""
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from dataset.sizes import (FACTOR_MAX, FACTOR_MIN, equivalent_diameters, estimate_diameter, median_diameter,
                           size_factor, split_foreground)
from tests.conftest import disk
from tests.test_torch_free import CHECK, run_python


def disks(diameters, centres, shape):
    labels = np.zeros(shape, np.int32)
    for i, (d, c) in enumerate(zip(diameters, centres), 1):
        labels[disk(shape, c, d / 2) & (labels == 0)] = i
    return labels


def touching_grid(diameter, rows=3, cols=4, overlap=0.08):
    """rows x cols disks whose centres are (1 - overlap) diameters apart: every disk touches its
    neighbours, and the whole grid is one connected foreground."""
    step = diameter * (1 - overlap)
    margin = diameter
    shape = (int(2 * margin + step * (rows - 1)) + 1, int(2 * margin + step * (cols - 1)) + 1)
    centres = [(margin + r * step, margin + c * step) for r in range(rows) for c in range(cols)]
    return disks([diameter] * len(centres), centres, shape)


def blurred(labels, sigma=1.5, noise=0.0, seed=0):
    """A semantic probability map like a network's: the blurred foreground, plus smooth noise."""
    semantic = cv2.GaussianBlur((labels > 0).astype(np.float32), (0, 0), sigma)
    if noise:
        field = cv2.GaussianBlur(np.random.default_rng(seed).standard_normal(labels.shape).astype(np.float32),
                                 (0, 0), 1.5)
        semantic = semantic + noise * field / field.std()
    return np.clip(semantic, 0, 1)


def test_equivalent_and_median_diameters():
    labels = disks([10, 30, 50], [(30, 30), (30, 80), (100, 60)], (160, 140))
    np.testing.assert_allclose(equivalent_diameters(labels), [10, 30, 50], rtol=0.06)
    assert median_diameter(labels) == pytest.approx(30, rel=0.03)
    assert median_diameter(np.zeros((8, 8), np.int32)) is None
    labels[labels == 2] = 7  # ids need not be consecutive
    assert median_diameter(labels) == pytest.approx(30, rel=0.03)


def test_size_factor_is_clamped_and_one_without_nuclei():
    assert size_factor(40.0, 20.0) == 0.5 and size_factor(10.0, 20.0) == 2.0
    assert size_factor(1000.0, 20.0) == FACTOR_MIN and size_factor(1.0, 20.0) == FACTOR_MAX
    assert size_factor(None, 20.0) == 1.0 and size_factor(0.0, 20.0) == 1.0


@pytest.mark.parametrize("diameter", [8, 20, 40, 100])
def test_separate_disks_of_any_size(diameter):
    shape = (4 * diameter, 5 * diameter)
    centres = [(diameter, diameter), (diameter, 2.6 * diameter), (2.8 * diameter, 1.5 * diameter),
               (2.8 * diameter, 3.6 * diameter)]
    labels = disks([diameter] * 4, centres, shape)
    assert estimate_diameter(blurred(labels)) == pytest.approx(diameter, rel=0.1)


@pytest.mark.parametrize("diameter", [12, 20, 40, 100])  # 100: five times the default target
def test_touching_disks_are_measured_one_by_one(diameter):
    labels = touching_grid(diameter)
    semantic = blurred(labels, sigma=1.0)  # a blur of 1.5 pixels fills the necks of the 12-pixel disks
    # one connected blob: its own size says nothing about the nuclei
    assert ndimage.label(semantic > 0.5)[1] == 1
    assert estimate_diameter(semantic) == pytest.approx(diameter, rel=0.12)
    assert split_foreground(semantic > 0.5).max() == 12


@pytest.mark.parametrize("diameter", [20, 100])
def test_a_noisy_map_still_gives_the_size(diameter):
    labels = touching_grid(diameter, overlap=0.0)
    semantic = blurred(labels, sigma=0.1 * diameter, noise=0.15)
    assert estimate_diameter(semantic) == pytest.approx(diameter, rel=0.15)


def test_mixed_sizes_give_the_median_nucleus_not_the_mean_area():
    shape = (200, 260)
    labels = disks([12, 12, 14, 14, 16, 60], [(20, 20), (20, 60), (20, 100), (60, 20), (60, 60), (130, 170)], shape)
    assert estimate_diameter(blurred(labels, sigma=1.0)) == pytest.approx(14, rel=0.12)


def test_no_nucleus_gives_no_estimate():
    assert estimate_diameter(np.zeros((50, 50), np.float32)) is None
    speck = np.zeros((50, 50), np.float32)
    speck[10:12, 10:12] = 1  # 4 pixels: a speck, not a nucleus
    assert estimate_diameter(speck) is None


def test_faint_texture_does_not_outvote_a_few_sure_nuclei():
    """An unseen stain's background can come out as many faint nucleus-like pieces; the estimate is
    the size of the sure nuclei, not of the texture (which once made prediction enlarge 4x)."""
    shape = (160, 320)
    sure = disks([24] * 5, [(30, 30), (30, 80), (90, 30), (90, 80), (130, 55)], shape)
    semantic = blurred(sure, sigma=1.0)
    texture = disks([7] * 40, [(15 + 20 * (i // 8), 150 + 20 * (i % 8)) for i in range(40)], shape)
    semantic = np.where(texture > 0, 0.62, semantic).astype(np.float32)
    assert estimate_diameter(semantic, confidence=0.0) < 10  # the texture outvotes the nuclei
    assert estimate_diameter(semantic) == pytest.approx(24, rel=0.1)
    # a map where every piece is faint still gets an estimate
    assert estimate_diameter(np.where(texture > 0, 0.62, 0).astype(np.float32)) == pytest.approx(7, rel=0.15)


def test_an_elongated_nucleus_is_one_piece():
    yy, xx = np.mgrid[:120, :200]
    ellipse = ((yy - 60) / 20) ** 2 + ((xx - 100) / 70) ** 2 <= 1
    assert split_foreground(ellipse).max() == 1
    assert estimate_diameter(ellipse.astype(np.float32)) == pytest.approx(2 * math.sqrt(20 * 70), rel=0.05)


def test_the_sizes_module_does_not_import_torch(tmp_path):
    result = run_python(f"import dataset.sizes; {CHECK}", tmp_path)
    assert result.returncode == 0, result.stderr
