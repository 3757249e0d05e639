"""Augmentation keeps image and labels aligned and never invents instance ids."""
import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from dataset.augment import Augmenter, elastic, lose_resolution, random_crop, scaled_crop, stretch
from tests.conftest import disk

COLOURS = np.array([[0, 0, 0]] + [[(37 * i) % 200 + 50, (91 * i) % 200 + 50, (53 * i) % 200 + 50]
                                  for i in range(1, 40)], np.uint8)


def painted(shape=(120, 150), n=25, seed=0):
    """Labels of random disks and an image whose colour encodes each pixel's label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        labels[disk(shape, (rng.integers(0, shape[0]), rng.integers(0, shape[1])), rng.integers(4, 12))] = i
    return COLOURS[labels], labels


def match_rate(image, labels):
    """Share of nucleus pixels (away from borders, where resampling blends colours) whose colour
    is the colour of their label."""
    inner = ndimage.minimum_filter(labels, 5) == ndimage.maximum_filter(labels, 5)
    inner &= labels > 0
    assert inner.sum() > 100
    return (image[inner] == COLOURS[labels[inner]]).all(axis=1).mean()


def assert_aligned(image, labels, source_ids):
    assert set(np.unique(labels)) <= set(source_ids)
    # strong elastic folds on a small crop leave a few mixed pixels; a misalignment leaves most
    assert match_rate(image, labels) > 0.97


def test_the_alignment_check_catches_a_flip_of_one_side():
    image, labels = painted()
    assert match_rate(image, labels) == 1.0
    assert match_rate(image[:, ::-1], labels) < 0.5


@pytest.mark.parametrize("seed", range(5))
def test_geometry_moves_image_and_labels_together(cfg, seed):
    image, labels = painted(seed=seed)
    pre = cfg.replace("pre", width=96, rescale_min=0.7, rescale_max=1.4).pre
    out_image, out_labels = Augmenter(pre).geometric(image, labels, np.random.default_rng(seed))
    assert out_image.shape == (96, 96, 3) and out_labels.shape == (96, 96) and out_labels.dtype == np.int32
    assert_aligned(out_image, out_labels, np.unique(labels))


def test_elastic_alone_keeps_alignment():
    image, labels = painted()
    out_image, out_labels = elastic(image, labels, 20.0, 5.0, np.random.default_rng(1))
    assert not np.array_equal(out_labels, labels)
    assert_aligned(out_image, out_labels, np.unique(labels))


def test_small_images_are_padded_with_background():
    image, labels = painted((40, 50), n=5)
    out_image, out_labels = random_crop(image, labels, 64, 1.0, np.random.default_rng(0))
    assert out_labels.shape == (64, 64)
    assert (out_labels > 0).sum() == (labels > 0).sum()  # nothing lost, nothing invented


def test_same_seed_same_sample_and_photometric_range(cfg):
    image, labels = painted()
    aug = Augmenter(cfg.replace("pre", width=64, noise=True, color_invert=True, clahe=True).pre)
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(7)
        im, lab = aug.geometric(image, labels, rng)
        runs.append((aug.photometric(im, rng), lab))
    assert np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][0].equal(runs[1][0])
    tensor = runs[0][0]
    assert tensor.shape == (3, 64, 64) and tensor.dtype.is_floating_point
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_switches_off_give_a_plain_crop(cfg):
    image, labels = painted()
    pre = cfg.replace("pre", width=64, rescale=False, elastic=False, flip=False, rotate=False,
                      color_jitter=False, channel_shuffle=False, grayscale=0.0).pre
    aug = Augmenter(pre)
    rng = np.random.default_rng(3)
    im, lab = aug.geometric(image, labels, rng)
    # a plain crop is a window of the source: find it by its labels
    hits = [(y, x) for y in range(labels.shape[0] - 63) for x in range(labels.shape[1] - 63)
            if np.array_equal(labels[y:y + 64, x:x + 64], lab)]
    assert hits and np.array_equal(image[hits[0][0]:hits[0][0] + 64, hits[0][1]:hits[0][1] + 64], im)
    assert np.allclose(aug.photometric(im, rng).permute(1, 2, 0).numpy() * 255, im)


def test_stretch_contrast_brightens_dim_images_and_spares_flat_ones():
    from dataset.augment import stretch_contrast
    rng = np.random.default_rng(0)
    dim = rng.integers(0, 8, (64, 64, 3)).astype(np.uint8)
    dim[20:30, 20:30] = 40                       # a dim nucleus
    out = stretch_contrast(dim)
    assert out[25, 25, 0] == 255 and out.dtype == np.uint8
    flat = np.full((32, 32, 3), 100, np.uint8)
    flat[0, 0] = 104
    assert stretch_contrast(flat).max() == round(4 * 255 / 16)  # a 4-level step becomes 64, not 255
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0], colour[..., 1] = 200, 100
    stretched = stretch_contrast(colour)
    assert stretched[0, 0, 0] > stretched[0, 0, 1] > stretched[0, 0, 2]  # channel order kept


def test_training_and_prediction_see_the_same_preprocessing(cfg):
    from dataset import NucleiDataset, list_samples
    from dataset.augment import prepare_image, to_tensor_image
    from tests.conftest import SAMPLE
    c = cfg.replace("pre", stretch=True, clahe=True)
    data = NucleiDataset(list_samples(SAMPLE)[:1], c, augment=False)
    image, _ = data.decoded(0)
    assert torch.equal(data[0]["image"], to_tensor_image(prepare_image(image, c.pre)))
    assert not torch.equal(data[0]["image"], to_tensor_image(image))


def disks_of(diameter, shape=(300, 300), gap=1.6, seed=0):
    """A grid of disks of one diameter (with a little jitter) and an image painted by label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    step = int(diameter * gap)
    n = 0
    for y in range(step // 2, shape[0] - step // 2, step):
        for x in range(step // 2, shape[1] - step // 2, step):
            n += 1
            labels[disk(shape, (y, x), diameter / 2 * rng.uniform(0.9, 1.1))] = n
    return COLOURS[labels % len(COLOURS)], labels


def inner_median_diameter(labels):
    """Median equivalent diameter of the nuclei that the crop's border does not cut."""
    from dataset.sizes import equivalent_diameters
    cut = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    kept = np.where(np.isin(labels, cut), 0, labels)
    return np.median(equivalent_diameters(kept))


@pytest.mark.parametrize("diameter", [40, 10])  # twice and half the target
def test_size_norm_brings_the_median_nucleus_to_the_target(cfg, diameter):
    image, labels = disks_of(diameter, shape=(400, 400) if diameter == 40 else (160, 160))
    target, low, high = 20.0, 0.8, 1.25
    pre = cfg.replace("pre", width=96, size_norm=True, nucleus_diameter=target,
                      rescale_min=low, rescale_max=high).pre
    sizes = []
    for seed in range(6):
        out_image, out_labels = Augmenter(pre).geometric(image, labels, np.random.default_rng(seed))
        assert out_image.shape == (96, 96, 3) and out_labels.dtype == np.int32
        assert set(np.unique(out_labels)) <= set(np.unique(labels))
        sizes.append(inner_median_diameter(out_labels))
    # within the jitter around the target (plus the disks' own 10 % spread and the elastic warp)
    assert all(target * low * 0.85 <= d <= target * high * 1.15 for d in sizes), sizes
    # without size_norm the same jitter leaves them near their own size
    plain = Augmenter(cfg.replace("pre", width=160, rescale_min=low, rescale_max=high).pre)
    d = inner_median_diameter(plain.geometric(image, labels, np.random.default_rng(0))[1])
    assert np.isfinite(d) and not target * low * 0.85 <= d <= target * high * 1.15


def test_size_norm_is_deterministic_and_a_sample_without_nuclei_gets_the_jitter_only(cfg):
    image, labels = disks_of(40)
    aug = Augmenter(cfg.replace("pre", width=64, size_norm=True).pre)
    a = aug.geometric(image, labels, np.random.default_rng(5))
    b = aug.geometric(image, labels, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    empty = np.zeros_like(labels)
    pre = dict(width=64, elastic=False, flip=False, rotate=False, rescale_min=0.5, rescale_max=2.0)
    normed = Augmenter(cfg.replace("pre", size_norm=True, **pre).pre).geometric(image, empty, np.random.default_rng(2))
    jitter = Augmenter(cfg.replace("pre", **pre).pre).geometric(image, empty, np.random.default_rng(2))
    # the same window at the same scale; only the resampling of a window that leaves the image differs
    assert np.abs(normed[0].astype(int) - jitter[0].astype(int)).mean() < 8


@pytest.mark.parametrize("scale", [1.0, 1.7, 3.0])
def test_scaled_crop_equals_random_crop_inside_the_image(scale):
    image, labels = painted((200, 220))
    a = random_crop(image, labels, 64, scale, np.random.default_rng(4))
    b = scaled_crop(image, labels, 64, scale, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_scaled_crop_of_a_far_too_large_window_stays_small_and_loses_no_nucleus():
    image, labels = painted((40, 50), n=5)
    out_image, out_labels = scaled_crop(image, labels, 64, 0.125, np.random.default_rng(0))
    assert out_image.shape == (64, 64, 3) and out_labels.shape == (64, 64)
    # the whole image, shrunk 8 times, lies on the canvas: every nucleus area scaled by 1 / 64
    assert abs((out_labels > 0).sum() - (labels > 0).sum() / 64) <= 4
    assert (out_labels > 0).any() and set(np.unique(out_labels)) <= set(np.unique(labels))
    background = out_labels == 0
    assert (out_image[background] == np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)).all(axis=1).mean() > 0.8


def test_lose_resolution_blurs_like_a_smaller_capture_and_keeps_the_size():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert lose_resolution(sharp, 1.0) is sharp
    blurred = lose_resolution(sharp, 2.5)
    assert blurred.shape == sharp.shape and blurred.dtype == np.uint8
    # pixel-to-pixel differences (fine detail) fall, the mean intensity stays
    detail = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert detail(blurred) < 0.5 * detail(sharp)
    assert abs(blurred.astype(float).mean() - sharp.astype(float).mean()) < 3
    flat = np.full((30, 30, 3), 90, np.uint8)
    assert (lose_resolution(flat, 3.0) == 90).all()


def crops_without_and_with(cfg, **setting):
    """One 96-pixel crop of painted disks (no other geometric augmentation) drawn with the same
    generator state, without and with `setting`: ((image, labels), (image, labels), source labels)."""
    image, labels = painted(shape=(160, 160), n=30, seed=3)
    off = dict(rescale=False, elastic=False, flip=False, rotate=False, width=96)
    plain = Augmenter(cfg.replace("pre", **off).pre)
    other = Augmenter(cfg.replace("pre", **off, **setting).pre)
    return (plain.geometric(image, labels, np.random.default_rng(5)),
            other.geometric(image, labels, np.random.default_rng(5)), labels)


def test_resolution_jitter_blurs_the_image_and_leaves_the_labels(cfg):
    (a_image, a_labels), (b_image, b_labels), _ = crops_without_and_with(cfg, resolution_jitter=1.0)
    assert np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_image, b_image)
    assert np.abs(np.diff(b_image.astype(float), axis=1)).mean() < np.abs(np.diff(a_image.astype(float), axis=1)).mean()
    # off by default: the crop draws nothing more from the generator, so earlier runs repeat
    assert cfg.pre.resolution_jitter == 0.0


def test_nucleus_texture_dims_inside_the_nuclei_and_spares_rims_and_background(cfg):
    (a_image, a_labels), (b_image, b_labels), _ = crops_without_and_with(cfg, nucleus_texture=1.0)
    assert np.array_equal(a_labels, b_labels)
    interior = cv2.erode((a_labels > 0).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    changed = (a_image != b_image).any(axis=-1)
    assert changed.any() and not (changed & ~interior).any()  # rims and background as they were
    assert changed.sum() > 0.3 * interior.sum()
    assert (b_image <= a_image).all()  # chromatin granules are darker, never brighter
    assert cfg.pre.nucleus_texture == 0.0  # off by default: nothing more drawn from the generator


def test_background_texture_lifts_the_background_more_than_the_nuclei(cfg):
    (a_image, a_labels), (b_image, b_labels), _ = crops_without_and_with(cfg, background_texture=1.0)
    assert np.array_equal(a_labels, b_labels)
    a, b = a_image.astype(float), b_image.astype(float)
    assert (b >= a).all()  # a screen blend only brightens
    inside, outside = a_labels > 0, a_labels == 0
    lift_out, lift_in = (b - a)[outside].mean(), (b - a)[inside].mean()
    assert lift_out > 10 and lift_in < lift_out  # the dark background gains most: contrast falls
    assert b[outside].std() > a[outside].std() + 5  # and gets texture
    assert cfg.pre.background_texture == 0.0  # off by default: nothing more drawn from the generator


def test_nucleus_texture_on_colour_spares_grey_samples(cfg):
    image, labels = painted(shape=(160, 160), n=30, seed=3)
    off = dict(rescale=False, elastic=False, flip=False, rotate=False, width=96, nucleus_texture=1.0)
    everywhere = Augmenter(cfg.replace("pre", **off).pre)
    colour_only = Augmenter(cfg.replace("pre", **off, nucleus_texture_on="colour").pre)
    plain = Augmenter(cfg.replace("pre", **{**off, "nucleus_texture": 0.0}).pre)
    textured = everywhere.geometric(image, labels, np.random.default_rng(5), colour=False)[0]
    untouched = plain.geometric(image, labels, np.random.default_rng(5))[0]
    assert not np.array_equal(textured, untouched)  # `all` textures a grey sample too
    # `colour`: a grey sample comes out as without the texture, a colour one as with `all`
    assert np.array_equal(colour_only.geometric(image, labels, np.random.default_rng(5), colour=False)[0], untouched)
    assert np.array_equal(colour_only.geometric(image, labels, np.random.default_rng(5), colour=True)[0], textured)
    assert cfg.pre.nucleus_texture_on == "all"


def test_stretch_elongates_nuclei_along_its_direction_and_keeps_them_aligned():
    image, labels = painted(shape=(160, 160), n=30, seed=4)
    for angle in (0.0, np.pi / 2, np.pi / 4):
        out_image, out_labels = stretch(image, labels, 2.0, angle)
        assert out_image.shape == image.shape and out_labels.dtype == labels.dtype
        assert_aligned(out_image, out_labels, np.unique(labels))
    # a disk in the middle, stretched twice along x: twice as wide, as tall as before
    centre = np.zeros((101, 101), np.int32)
    centre[disk(centre.shape, (50, 50), 10)] = 1
    _, wide = stretch(COLOURS[centre], centre, 2.0, 0.0)
    rows, cols = np.nonzero(wide)
    assert cols.max() - cols.min() + 1 == pytest.approx(2 * 21, abs=2)
    assert rows.max() - rows.min() + 1 == pytest.approx(21, abs=1)
    _, tall = stretch(COLOURS[centre], centre, 2.0, np.pi / 2)
    assert np.array_equal(tall, wide.T)
    assert np.array_equal(stretch(COLOURS[centre], centre, 1.0, 0.3)[1], centre)


def test_aspect_jitter_is_off_by_default_and_stretches_crops_when_on(cfg):
    (a_image, a_labels), (b_image, b_labels), labels = crops_without_and_with(cfg, aspect_jitter=3.0)
    assert not np.array_equal(a_labels, b_labels)
    assert_aligned(b_image, b_labels, np.unique(labels))
    # the stretch keeps the size across it, so the nuclei cover more of the crop, never less
    assert (b_labels > 0).sum() >= (a_labels > 0).sum()
    assert cfg.pre.aspect_jitter == 1.0
