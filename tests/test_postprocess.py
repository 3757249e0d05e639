"""postprocess.py: probability maps -> instance labels, checked against dataset.targets round trips."""
import dataclasses

import numpy as np
import pytest

import postprocess as pp
from tests.conftest import disk
from dataset.targets import make_targets
from config import ConfigError, load_config
from postprocess import postprocess

DEFAULT = load_config(user_path=None)


def PostSettings(**values):
    """The [post] settings of config_default.ini with some values changed."""
    return DEFAULT.replace("post", **values).post

HEADS = {1: ("semantic",), 2: ("semantic", "contour"), 3: ("semantic", "contour", "marker")}


def paint(shape, disks) -> np.ndarray:
    """int32 labels of disks (centre, radius); where disks overlap, the nearer centre wins,
    so overlapping disks become touching nuclei with a straight contact line."""
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for i, (centre, radius) in enumerate(disks, start=1):
        d = np.hypot(yy - centre[0], xx - centre[1])
        win = disk(shape, centre, radius) & (d < best)
        labels[win] = i
        best[win] = d[win]
    return labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def best_ious(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    """For each truth object, the IoU of the predicted object overlapping it most."""
    out = []
    for t in range(1, int(truth.max()) + 1):
        m = truth == t
        ids, counts = np.unique(pred[m], return_counts=True)
        counts = counts[ids > 0]
        ids = ids[ids > 0]
        out.append(iou(pred == ids[np.argmax(counts)], m) if ids.size else 0.0)
    return out


def assert_matches(pred: np.ndarray, truth: np.ndarray, min_iou: float = 0.9):
    assert pred.dtype == np.int32
    n = int(truth.max())
    assert pred.max() == n, f"{pred.max()} objects, expected {n}"
    assert set(np.unique(pred)) == set(range(n + 1))
    scores = best_ious(pred, truth)
    assert min(scores) > min_iou, scores


def probs_of(targets, heads):
    return {name: targets[name] for name in HEADS[heads]}


SEPARATE = paint((96, 96), [((20, 20), 10), ((20, 70), 8), ((70, 25), 12), ((72, 72), 9)])
TOUCHING = paint((96, 112), [((30, 30), 12), ((30, 50), 12),                 # a pair
                             ((72, 30), 11), ((72, 50), 11), ((56, 40), 10),  # a triple
                             ((70, 90), 9)])                                  # alone


@pytest.mark.parametrize("policy", ["ws", "rw"])
@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("truth", [SEPARATE, TOUCHING], ids=["separate", "touching"])
def test_round_trip(cfg, truth, heads, policy):
    targets = make_targets(truth, cfg.contour, cfg.target)
    pred = postprocess(probs_of(targets, heads), PostSettings(policy=policy))
    assert_matches(pred, truth)


@pytest.mark.parametrize("policy", ["ws", "rw"])
@pytest.mark.parametrize("contour", [dict(thickness=2), dict(adjacent_boundary_only=True),
                                     dict(precise=False)], ids=["thick", "adjacent", "straddle"])
def test_round_trip_contour_settings(cfg, contour, policy):
    targets = make_targets(TOUCHING, cfg.replace("contour", **contour).contour, cfg.target)
    for heads in (2, 3):
        pred = postprocess(probs_of(targets, heads), PostSettings(policy=policy))
        assert_matches(pred, TOUCHING)


def test_soft_probabilities(cfg):
    """Blurred, noisy maps (as a network gives) still come out object for object."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    targets = make_targets(TOUCHING, cfg.contour, cfg.target)
    soft = {k: np.clip(ndimage.gaussian_filter(targets[k], 0.7) + rng.normal(0, 0.05, TOUCHING.shape),
                       0, 1).astype(np.float32) for k in HEADS[3]}
    for heads in (2, 3):
        for policy in ("ws", "rw"):
            assert_matches(postprocess(probs_of(soft, heads), PostSettings(policy=policy)),
                           TOUCHING, 0.8)


@pytest.mark.parametrize("policy", ["ws", "rw"])
def test_one_head_splits_two_touching_disks(policy):
    truth = paint((64, 64), [((32, 22), 10), ((32, 40), 10)])
    assert np.unique(truth).tolist() == [0, 1, 2] and (truth > 0).sum() > 0
    seeds, n = pp.seeds({"semantic": (truth > 0).astype(np.float32)}, PostSettings())
    assert n == 2 and seeds[32, 22] != seeds[32, 40]
    pred = postprocess({"semantic": (truth > 0).astype(np.float32)}, PostSettings(policy=policy))
    assert_matches(pred, truth)


@pytest.mark.parametrize("heads", [2, 3])
def test_seed_peaks_split_what_a_weak_contour_leaves_joined(heads):
    """A contour head that missed the border between two touching nuclei: its core is one
    component, one seed; with seed_peaks the core's distance peaks give two, as for one head."""
    truth = paint((64, 64), [((32, 22), 10), ((32, 40), 10)])
    fg = (truth > 0).astype(np.float32)
    probs = {"semantic": fg, "contour": np.zeros_like(fg), "marker": fg}
    probs = {k: probs[k] for k in HEADS[heads]}
    _, n = pp.seeds(probs, PostSettings())
    assert n == 1
    seeds, n = pp.seeds(probs, PostSettings(seed_peaks=True))
    assert n == 2 and seeds[32, 22] != seeds[32, 40] and 0 not in (seeds[32, 22], seeds[32, 40])
    assert_matches(postprocess(probs, PostSettings(seed_peaks=True)), truth)
    # where the contour head did cut them apart, the peaks keep them apart too
    contour = np.zeros_like(fg)
    contour[:, 30:33] = 1
    probs["contour"] = contour
    assert pp.seeds(probs, PostSettings())[1] == 2 and pp.seeds(probs, PostSettings(seed_peaks=True))[1] == 2
    # small seed components (a marker head's eroded cores) have no dome of their own: they stay seeds
    small = np.zeros((40, 40), np.float32)
    for y, x in ((10, 10), (10, 30), (30, 20)):
        small[y - 1:y + 2, x - 1:x + 2] = 1
    probs = {"semantic": np.ones_like(small), "contour": np.zeros_like(small), "marker": small}
    probs = {k: probs[k] for k in HEADS[heads]} if heads == 3 else {"semantic": small, "contour": 0 * small}
    assert pp.seeds(probs, PostSettings(seed_peaks=True))[1] == pp.seeds(probs, PostSettings())[1] == 3


def test_semantic_only_post_processes_like_one_head():
    truth = paint((64, 64), [((32, 22), 10), ((32, 40), 10)])
    fg = (truth > 0).astype(np.float32)
    probs = {"semantic": fg, "contour": np.zeros_like(fg), "marker": fg}
    alone = postprocess({"semantic": fg}, PostSettings())
    assert postprocess(probs, PostSettings()).max() == 1  # the missed border merges the two
    assert np.array_equal(postprocess(probs, PostSettings(semantic_only=True)), alone) and alone.max() == 2


@pytest.mark.parametrize("policy", ["ws", "rw"])
def test_missed_blob_becomes_instance(cfg, policy):
    truth = paint((64, 64), [((20, 20), 8), ((44, 44), 8)])
    targets = make_targets(truth, cfg.contour, cfg.target)
    targets["marker"][truth == 2] = 0  # the network missed the second nucleus' marker
    pred = postprocess(probs_of(targets, 3), PostSettings(policy=policy))
    assert_matches(pred, truth)


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_small_objects_removed(cfg, heads):
    truth = paint((64, 64), [((20, 20), 8), ((45, 45), 1)])  # the second has 5 pixels
    targets = make_targets(truth, cfg.contour, cfg.target)
    for policy in ("ws", "rw"):
        pred = postprocess(probs_of(targets, heads), PostSettings(policy=policy))
        assert pred.max() == 1 and pred[45, 45] == 0
        kept = postprocess(probs_of(targets, heads), PostSettings(policy=policy, min_object_size=0))
        assert kept.max() == 2 and kept[45, 45] == 2


@pytest.mark.parametrize("heads", [1, 2])
def test_holes_filled(heads):
    ring = disk((64, 64), (32, 32), 14) & ~disk((64, 64), (32, 32), 4)
    probs = {"semantic": ring.astype(np.float32),
             "contour": np.zeros((64, 64), np.float32)}
    probs = {k: probs[k] for k in HEADS[heads]}
    for policy in ("ws", "rw"):
        filled = postprocess(probs, PostSettings(policy=policy))
        assert filled.max() == 1 and (filled > 0).sum() == disk((64, 64), (32, 32), 14).sum()
        kept = postprocess(probs, PostSettings(policy=policy, fill_holes=False))
        assert kept.max() == 1 and (kept > 0).sum() == ring.sum()


def test_fill_holes_only_inside_one_instance():
    labels = np.zeros((20, 20), np.int32)
    labels[2:9, 2:9] = 1
    labels[4:7, 4:7] = 0          # a hole of instance 1
    labels[10:18, 2:18] = 2
    labels[10:18, 10:18] = 3      # 2 and 3 touch along x = 10
    labels[13:15, 9:11] = 0       # a gap enclosed by both 2 and 3
    out = pp.fill_instance_holes(labels)
    assert (out[4:7, 4:7] == 1).all()
    assert (out[13:15, 9:11] == 0).all()
    assert (out[labels > 0] == labels[labels > 0]).all()


@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("policy", ["ws", "rw"])
def test_empty_maps(heads, policy):
    probs = {k: np.zeros((64, 80), np.float32) for k in HEADS[heads]}
    out = postprocess(probs, PostSettings(policy=policy))
    assert out.dtype == np.int32 and out.shape == (64, 80) and not out.any()


def test_labels_sequential_int32(cfg):
    # seeds whose objects are removed as too small leave no gaps in the numbering
    truth = paint((96, 96), [((10, 10), 1), ((30, 30), 9), ((50, 10), 1), ((70, 70), 9), ((90, 90), 1)])
    targets = make_targets(truth, cfg.contour, cfg.target)
    for heads in (1, 2, 3):
        pred = postprocess(probs_of(targets, heads), PostSettings(policy="ws", min_object_size=10))
        assert pred.dtype == np.int32
        assert np.unique(pred).tolist() == [0, 1, 2]


def test_settings():
    s = PostSettings()
    assert (s.policy, s.threshold, s.threshold_edge, s.threshold_mark, s.min_object_size,
            s.fill_holes) == ("ws", 0.5, 0.5, 0.5, 10, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.policy = "rw"
    with pytest.raises(ConfigError):
        PostSettings(policy="graphcut")
    with pytest.raises(ValueError):
        postprocess({"contour": np.zeros((8, 8))}, s)


def _agreement(a: np.ndarray, b: np.ndarray, fg: np.ndarray) -> float:
    """Pixel agreement on the foreground after mapping each label of a to its best label of b."""
    mapped = np.zeros(int(a.max()) + 1, np.int64)
    for i in range(1, int(a.max()) + 1):
        ids, counts = np.unique(b[a == i], return_counts=True)
        mapped[i] = ids[np.argmax(counts)] if ids.size else 0
    return float((mapped[a][fg] == b[fg]).mean())


def test_per_region_walker_matches_whole_image(cfg):
    targets = make_targets(TOUCHING, cfg.contour, cfg.target)
    for heads in (1, 2, 3):
        probs = probs_of(targets, heads)
        settings = PostSettings(policy="rw")
        seeds, _ = pp.seeds(probs, settings)
        fg = pp.foreground(probs, settings, seeds)
        region = pp.random_walker_per_region(probs, seeds, fg)
        whole = pp.random_walker_whole_image(probs, seeds, fg)
        assert _agreement(region, whole, fg) > 0.95
        assert _agreement(whole, region, fg) > 0.95


def count_walker_solves(monkeypatch) -> list:
    """The shapes of the random walker solves made from now on (the list fills as they happen)."""
    calls = []
    real = pp.random_walker

    def counting(data, labels, *args, **kwargs):
        calls.append(data.shape)
        return real(data, labels, *args, **kwargs)

    monkeypatch.setattr(pp, "random_walker", counting)
    return calls


def test_single_seed_regions_skip_the_solver(cfg, monkeypatch):
    # five separate nuclei and one pair of touching nuclei: one solve, for the pair
    truth = paint((96, 128), [((16, 16), 8), ((16, 56), 8), ((16, 100), 8), ((60, 16), 8),
                              ((80, 60), 8), ((60, 90), 12), ((60, 110), 12)])
    targets = make_targets(truth, cfg.contour, cfg.target)
    calls = count_walker_solves(monkeypatch)
    for heads in (1, 2, 3):
        calls.clear()
        pred = postprocess(probs_of(targets, heads), PostSettings(policy="rw"))
        assert len(calls) == 1, heads
        assert calls[0][0] * calls[0][1] < 60 * 60  # cropped to the pair, not the whole image
        assert_matches(pred, truth)


def test_regions_too_large_for_the_walker_get_the_watershed(cfg, monkeypatch):
    # the pair of touching nuclei is one region with two seeds; with the work cap below its
    # seeds x pixels, it is split by the watershed (no solve) and still gives the two nuclei
    truth = paint((96, 128), [((16, 16), 8), ((60, 90), 12), ((60, 110), 12)])
    targets = make_targets(truth, cfg.contour, cfg.target)
    calls = count_walker_solves(monkeypatch)
    for heads in (1, 2, 3):
        probs = probs_of(targets, heads)
        settings = PostSettings(policy="rw")
        seeds, _ = pp.seeds(probs, settings)
        fg = pp.foreground(probs, settings, seeds)
        monkeypatch.setattr(pp, "RW_MAX_WORK", 10**9)
        calls.clear()
        walked = pp.random_walker_per_region(probs, seeds, fg)
        assert len(calls) == 1, heads
        monkeypatch.setattr(pp, "RW_MAX_WORK", 100)
        calls.clear()
        capped = pp.random_walker_per_region(probs, seeds, fg)
        assert calls == [], heads
        flooded = pp.watershed_partition(probs, seeds, fg)  # the same flood, but over every region
        # the same except on column 100, midway between the two equal disks, where the flood meets
        # ties that the order of the pixels (a crop's or the whole image's) breaks
        off_tie = fg.copy()
        off_tie[:, 100] = False
        assert _agreement(capped, flooded, off_tie) > 0.99 and _agreement(flooded, capped, off_tie) > 0.99, heads
        assert _agreement(capped, walked, fg) > 0.95
        assert_matches(postprocess(probs, settings), truth)


def test_no_torch_import():
    import subprocess
    import sys
    code = "import sys, postprocess; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pp.__file__.rsplit("/", 1)[0])


def test_drop_faint_removes_only_faint_instances_and_renumbers():
    from postprocess import drop_faint
    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 2:8], labels[2:8, 12:18], labels[12:18, 22:28] = 1, 2, 3
    semantic = np.where(labels > 0, 0.95, 0.0).astype(np.float32)
    semantic[labels == 2] = 0.6
    out = drop_faint(labels, semantic, 0.8)
    assert out.dtype == np.int32 and np.unique(out).tolist() == [0, 1, 2]
    assert (out[labels == 2] == 0).all() and (out[labels == 3] == 2).all()
    assert drop_faint(labels, semantic, 0.0) is labels
    assert (postprocess({"semantic": semantic}, PostSettings(min_confidence=0.8)) > 0).sum() == 72


@pytest.mark.parametrize("radius", [4, 10, 40])
def test_one_head_splits_touching_nuclei_alike_at_any_size(radius):
    # two nuclei touching at a neck 0.71 of their radius wide: 8 pixels across, their distance
    # peaks rise less than a pixel above the neck, which a height in pixels took for one nucleus
    shape = (6 * radius, 8 * radius)
    cy, cx = shape[0] // 2, shape[1] // 2
    pair = disk(shape, (cy, cx - 0.7 * radius), radius) | disk(shape, (cy, cx + 0.7 * radius), radius)
    assert postprocess({"semantic": pair.astype(np.float32)}, PostSettings()).max() == 2
    # peak_height = 1 is the old rule, a pixel whatever the size: the small pair stays one
    old = postprocess({"semantic": pair.astype(np.float32)}, PostSettings(peak_height=1.0)).max()
    assert old == (1 if radius == 4 else 2)
    one = disk(shape, (cy, cx), radius)
    assert postprocess({"semantic": one.astype(np.float32)}, PostSettings()).max() == 1


def test_a_known_diameter_gives_the_labels_of_the_estimate():
    # tuning estimates each map's diameter once and passes it; the labels must be those of the estimate
    shape = (48, 64)
    pair = disk(shape, (24, 32 - 2.8), 4) | disk(shape, (24, 32 + 2.8), 4)  # touching, 8 pixels across
    probs = {"semantic": pair.astype(np.float32)}
    known = pp.peak_diameter(probs["semantic"])
    np.testing.assert_array_equal(postprocess(probs, PostSettings(), known), postprocess(probs, PostSettings()))
    # and it is used: a diameter forty times larger caps the peak height at a pixel, merging the pair
    assert postprocess(probs, PostSettings(), 40 * known).max() == 1 < postprocess(probs, PostSettings()).max()


def test_seams_drawn_by_an_exclusive_target_go_back_to_their_nuclei():
    # a network trained with [contour] exclusive answers touching nuclei with a gap of background
    # where they touch (the target's adjacent-boundary ring); seam_width gives the gap back
    contour = dataclasses.replace(DEFAULT.contour, adjacent_boundary_only=True, exclusive=True)
    truth = paint((64, 96), [((32, 30), 12), ((32, 52), 12), ((12, 84), 6)])
    semantic = make_targets(truth, contour, DEFAULT.target)["semantic"]
    assert semantic.sum() < (truth > 0).sum()  # the target did leave out the touching border
    plain = postprocess({"semantic": semantic}, PostSettings())
    sealed = postprocess({"semantic": semantic}, PostSettings(seam_width=0.1))
    assert plain.max() == sealed.max() == 3
    for i in range(1, 4):  # each nucleus of the plain labels lies within one true nucleus
        assert np.unique(truth[plain == i]).size == 1
    # most of the gap goes back, each pixel to the nucleus it belongs to; little else is added
    missing = (truth > 0) & (plain == 0)
    given_back = missing & (sealed > 0)
    assert missing.sum() >= 20 and given_back.sum() >= 0.6 * missing.sum()
    same = [int(np.median(truth[sealed == i])) for i in range(1, 4)]
    assert sorted(same) == [1, 2, 3]
    assert all((truth[given_back] == np.array(same)[sealed[given_back] - 1]))
    assert ((sealed > 0) & (truth == 0)).sum() <= 0.3 * given_back.sum()
    lone = truth == 3
    assert ((sealed > 0) & lone).sum() == lone.sum() == ((plain > 0) & lone).sum()


def test_seam_width_is_bounded():
    with pytest.raises(ConfigError, match="seam_width"):
        DEFAULT.replace("post", seam_width=0.8)


def test_median_confidence_keeps_a_pitted_nucleus_and_still_drops_a_faint_one():
    # a textured nucleus the network left pitted (a third of its pixels at 0.2, the rest 0.98: mean
    # 0.72) and a faint answer to background texture (0.72 everywhere)
    shape = (48, 96)
    semantic = np.zeros(shape, np.float32)
    pitted, faint = disk(shape, (24, 24), 12), disk(shape, (24, 72), 12)
    rng = np.random.default_rng(0)
    semantic[pitted] = np.where(rng.random(pitted.sum()) < 1 / 3, 0.2, 0.98)
    semantic[faint] = 0.72
    labels = np.zeros(shape, np.int32)
    labels[pitted], labels[faint] = 1, 2
    by_mean = pp.drop_faint(labels, semantic, 0.8)
    by_median = pp.drop_faint(labels, semantic, 0.8, "median")
    assert by_mean.max() == 0
    assert by_median.max() == 1 and np.array_equal(by_median > 0, pitted)
    with pytest.raises(ConfigError, match="confidence"):
        DEFAULT.replace("post", confidence="mode")
