"""Targets on tiny synthetic label maps with exact expected pixels."""
import numpy as np
import pytest

from dataset.targets import centre_map, contour_map, inner_distance, make_targets, marker_map
from tests.conftest import disk


def square(shape=(10, 10), top=2, left=2, side=5, label=1, labels=None):
    labels = np.zeros(shape, np.int32) if labels is None else labels
    labels[top:top + side, left:left + side] = label
    return labels


def contour_cfg(cfg, **kw):
    return cfg.replace("contour", **kw).contour


def test_inner_distance_of_a_square():
    d = inner_distance(square())
    assert d[2:7, 2:7].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 2, 2, 2, 1],
        [1, 2, 3, 2, 1],
        [1, 2, 2, 2, 1],
        [1, 1, 1, 1, 1],
    ]
    assert d[square() == 0].max() == 0


def test_precise_contour_is_the_inner_ring(cfg):
    ring = contour_map(square(), contour_cfg(cfg, precise=True, thickness=1))
    expected = square().astype(bool)
    expected[3:6, 3:6] = False
    assert np.array_equal(ring, expected)
    thick = contour_map(square(), contour_cfg(cfg, precise=True, thickness=2))
    assert thick.sum() == 24 and not thick[4, 4]


def test_loose_contour_straddles_the_border(cfg):
    ring = contour_map(square(), contour_cfg(cfg, precise=False, thickness=1))
    # 16 inner ring pixels + 5 four-neighbours outside each side (diagonal corners are sqrt(2) away)
    assert ring.sum() == 16 + 20
    assert ring[1, 4] and ring[7, 4] and not ring[1, 1]


def test_touching_squares_share_only_their_contact_in_boundary_mode(cfg):
    labels = square((10, 14))
    square(left=7, label=2, labels=labels)
    d = inner_distance(labels)
    assert d[4, 6] == 1 and d[4, 7] == 1 and d[4, 5] == 2  # the other nucleus counts as outside
    ring = contour_map(labels, contour_cfg(cfg, adjacent_boundary_only=True, thickness=1))
    expected = np.zeros_like(ring)
    expected[2:7, 6:8] = True                    # the two columns in contact
    expected[[2, 6], 5] = expected[[2, 6], 8] = True  # corners of the ring next to them
    assert np.array_equal(ring, expected)


def test_far_apart_nuclei_have_no_adjacent_boundary(cfg):
    labels = square((10, 20))
    square(left=12, label=2, labels=labels)
    ring = contour_map(labels, contour_cfg(cfg, adjacent_boundary_only=True))
    assert not ring.any()


def test_marker_depth_and_small_nuclei_keep_a_centre():
    labels = square()
    assert marker_map(labels, 0).sum() == 25
    assert marker_map(labels, 1).sum() == 9
    assert marker_map(labels, 2).sum() == 1 and marker_map(labels, 2)[4, 4]
    assert marker_map(labels, 10).sum() == 1
    rng = np.random.default_rng(0)
    blobs = np.zeros((64, 64), np.int32)
    for i in range(1, 30):
        y, x, r = rng.integers(4, 60), rng.integers(4, 60), rng.integers(0, 6)
        blobs[disk(blobs.shape, (y, x), r)] = i
    marker = marker_map(blobs, 3)
    assert set(np.unique(blobs[marker])) == set(np.unique(blobs)) - {0}


def test_centre_map_is_linear_from_border_to_peak():
    c = centre_map(square(), inner_distance(square()))
    assert c[4, 4] == 1.0 and c[3, 4] == 0.5 and c[2, 4] == 0.0 and c[0, 0] == 0.0


def test_make_targets_weight_and_exclusive(cfg):
    labels = square()
    c = cfg.replace("target", weight_contour=5.0, weight_centre=2.0, marker_depth=1)
    t = make_targets(labels, c.contour, c.target)
    assert set(t) == {"semantic", "contour", "marker", "weight"}
    assert all(v.dtype == np.float32 and v.shape == labels.shape for v in t.values())
    assert t["semantic"].sum() == 25 and t["contour"].sum() == 16 and t["marker"].sum() == 9
    assert t["weight"][0, 0] == 1.0      # background
    assert t["weight"][2, 4] == 6.0      # contour: 1 + 5
    assert t["weight"][3, 4] == 2.0      # half way to the centre: 1 + 2 * 0.5
    assert t["weight"][4, 4] == 3.0      # centre: 1 + 2
    ex = c.replace("contour", exclusive=True)
    assert make_targets(labels, ex.contour, ex.target)["semantic"].sum() == 9
    off = c.replace("contour", detect=False)
    t_off = make_targets(labels, off.contour, off.target)
    assert t_off["contour"].sum() == 0 and t_off["weight"][2, 4] == 1.0


@pytest.mark.parametrize("model", ["unet", "caunet", "camunet"])
def test_contour_options_do_not_depend_on_the_model(cfg, model):
    labels = square((10, 14))
    square(left=7, label=2, labels=labels)
    c = cfg.replace("model", model=model).replace("contour", adjacent_boundary_only=True, exclusive=True)
    t = make_targets(labels, c.contour, c.target)
    assert t["contour"].sum() == 14 and t["semantic"].sum() == 50 - 14


def test_empty_labels(cfg):
    t = make_targets(np.zeros((8, 8), np.int32), cfg.contour, cfg.target)
    assert t["semantic"].sum() == t["contour"].sum() == t["marker"].sum() == 0
    assert (t["weight"] == 1).all()


def test_distance_transform_is_repeatable_and_exact():
    """OpenCV's precise distance transform varied in its last bit between calls, so two training
    runs with one seed drifted apart through the weight map."""
    import cv2
    from dataset.targets import _distance_to_zero
    rng = np.random.default_rng(0)
    mask = rng.random((300, 300)) > 0.02  # many small background holes: many distances
    runs = []
    for threads in (1, 2, 1, 2):
        cv2.setNumThreads(threads)
        runs.append(_distance_to_zero(mask))
    cv2.setNumThreads(-1)
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    from scipy import ndimage
    np.testing.assert_array_equal(runs[0], ndimage.distance_transform_edt(mask).astype(np.float32))


def test_distance_transform_of_a_mask_without_background_warns_nothing():
    import warnings
    from dataset.targets import _distance_to_zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distance = _distance_to_zero(np.ones((5, 6), bool))
    assert np.isfinite(distance).all() and distance.min() > 1000
