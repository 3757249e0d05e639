"""Joint image + instance-label augmentation, switched by `[pre]`.

Geometry (rescale + crop, a random loss of resolution, elastic distortion, flips, 90-degree
rotations) runs in OpenCV/numpy on the image and the label map together; labels are always
resampled with nearest neighbour, so an instance id is never interpolated into another. Colour
changes run afterwards on the image alone, with torchvision's transforms. The haematoxylin-eosin
stain jitter of `[pre] stain_jitter` (colour images only) comes before all of it, on the whole image
and before `prepare_image`, so that a stain view sees colours no training image has
(`dataset.torch_data.NucleiDataset`). All randomness comes
from a numpy Generator passed in, so a sample is reproducible from its seed whatever process draws
it.

With `[pre] size_norm` each sample is first brought to a common nucleus size (`dataset/sizes.py`):
the random rescale factor is multiplied by nucleus_diameter / the sample's median nucleus diameter.

Importing this module does not import torch: only `Augmenter.photometric` and `to_tensor_image`
need it, and import it when first called, so torch-free tools (preview.py) can use the geometry.
"""
from __future__ import annotations

from functools import cached_property

import cv2
import numpy as np

from config import PreConfig
from dataset.families import BRIGHT_MEDIAN, is_colour
from dataset.sizes import median_diameter, size_factor


def item_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random state of training item `index` at `epoch`: the same in any process or worker."""
    return np.random.default_rng([seed, epoch, index])


def apply_clahe(image: np.ndarray) -> np.ndarray:
    """Contrast limited adaptive histogram equalisation of the lightness channel (RGB uint8 in/out)."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def stretch_contrast(image: np.ndarray, low: float = 0.5, high: float = 99.9, min_range: float = 16.0) -> np.ndarray:
    """Map the image's `low`..`high` intensity percentiles (over all channels, so colours keep
    their balance) to 0..255. Dim fluorescence images then look like bright ones; a nearly flat
    image is stretched by at most 255 / min_range so its noise is not blown up."""
    lo, hi = np.percentile(image, (low, high))
    hi = max(hi, lo + min_range)
    table = np.clip((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo)), 0, 255)
    return np.round(table).astype(np.uint8)[image]


# skimage's rgb2hed clips negative stain concentrations, so hed2rgb(rgb2hed(x)) changes pale
# pixels by up to ~150 grey levels; the same product without the clip is exactly undone by hed2rgb
_LOG_ADJUST = float(np.log(1e-6))


def rgb_to_hed(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float64 (H, W, 3) haematoxylin, eosin, DAB concentrations in
    skimage's units (`skimage.color.rgb2hed`'s matrix and scale, negative values kept, so
    `skimage.color.hed2rgb` inverts it exactly)."""
    from skimage.color import hed_from_rgb
    rgb = np.maximum(image.astype(np.float64) / 255.0, 1e-6)
    return (np.log(rgb) / _LOG_ADJUST) @ hed_from_rgb


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_hed` (`skimage.color.hed2rgb`), rounded to RGB uint8."""
    from skimage.color import hed2rgb
    return np.round(hed2rgb(hed) * 255.0).astype(np.uint8)


def hed_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random stain variation of a colour image in haematoxylin-eosin-DAB space: each channel's
    concentration is multiplied by U(1 - strength, 1 + strength) and shifted by U(-strength,
    strength) optical density (natural log units), then turned back into RGB. RGB uint8 (H, W, 3)
    in and out. Grey images (`dataset.families.is_colour`) and strength 0 return the image
    unchanged; the six draws are taken from `rng` either way, so the draws after them do not depend
    on the image's colour."""
    scale = rng.uniform(1.0 - strength, 1.0 + strength, 3)
    shift = rng.uniform(-strength, strength, 3) / -_LOG_ADJUST
    if strength <= 0 or not is_colour(image):
        return image
    return hed_to_rgb(rgb_to_hed(image) * scale + shift)


def _grey_view(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """A float (H, W) map as a grey RGB uint8 image, its `low`..`high` percentiles mapped to 0..255."""
    lo, hi = np.percentile(values, (low, high))
    grey = np.clip((values - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255)
    return np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=2)


def haematoxylin_view(image: np.ndarray, low: float = 0.5, high: float = 99.9) -> np.ndarray:
    """A colour image's haematoxylin concentration as a grey RGB uint8 image (nuclei bright on dark,
    like fluorescence), its `low`..`high` percentiles mapped to 0..255. Grey images
    (`dataset.families.is_colour`) are returned unchanged."""
    if not is_colour(image):
        return image
    return _grey_view(rgb_to_hed(image)[..., 0], low, high)


def inverted_grey_view(image: np.ndarray, low: float = 0.5, high: float = 99.9) -> np.ndarray:
    """A colour image's luminance (OpenCV's grey), inverted, as a grey RGB uint8 image, its
    `low`..`high` percentiles mapped to 0..255: nuclei that absorb more light than their
    surroundings come out bright on dark whatever the stain's colour, where the haematoxylin view
    assumes one stain's colour. Grey images (`dataset.families.is_colour`) are returned unchanged."""
    if not is_colour(image):
        return image
    return _grey_view(255.0 - cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), low, high)


# `[pre] stain_norm` -> the view it applies to colour images (config.PreConfig lists the same names)
STAIN_VIEWS = {"hematoxylin": haematoxylin_view, "inverted_grey": inverted_grey_view}


def invert_if_bright(image: np.ndarray, median: float = BRIGHT_MEDIAN) -> np.ndarray:
    """A grey image whose median is `median` or more (brightfield: dark nuclei on a bright
    background) inverted, so nuclei are bright on dark as in fluorescence; other images unchanged.
    The default threshold is the family rule's (`dataset.families.BRIGHT_MEDIAN`)."""
    if is_colour(image) or np.median(image.mean(axis=2)) < median:
        return image
    return 255 - image


def prepare_key(pre: PreConfig | None) -> tuple | None:
    """The `[pre]` values `prepare_image` reads: members of an ensemble whose keys are equal need the
    image prepared once."""
    if pre is None:
        return None
    return (pre.stain_norm, pre.invert_bright, pre.stretch, pre.clahe)


# part of the disk cache's key for prepared images (NucleiDataset.prepared): raise it whenever
# prepare_image or the functions it calls change what they return
PREPARE_VERSION = 2  # 2: invert_bright leaves colour images alone after a stain view made them grey


def prepares_nothing(pre: PreConfig) -> bool:
    """True when `prepare_image` returns the image as it is."""
    return pre.stain_norm == "off" and not (pre.invert_bright or pre.stretch or pre.clahe)


def prepare_image(image: np.ndarray, pre: PreConfig) -> np.ndarray:
    """Deterministic whole-image preprocessing, the same for training and prediction:
    `[pre] stain_norm`, `invert_bright`, `stretch` then `clahe`. RGB uint8 (H, W, 3) in and out.

    `invert_bright` inverts only images that are grey as they come (brightfield): a colour image
    that a stain view has made grey already shows its nuclei bright, and tissue that fills the
    frame has a view whose median can pass the brightfield threshold (2 of DSB2018's 107 colour
    images, counted by bench/view_contrast.py), which inverted it back to dark nuclei unlike every
    other colour image."""
    grey = not is_colour(image)
    if pre.stain_norm != "off":
        image = STAIN_VIEWS[pre.stain_norm](image)
    if pre.invert_bright and grey:
        image = invert_if_bright(image)
    if pre.stretch:
        image = stretch_contrast(image)
    if pre.clahe:
        image = apply_clahe(image)
    return image


def random_crop(image: np.ndarray, labels: np.ndarray, width: int, scale: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random square window of side width / scale, resized to width x width.

    Images smaller than the window are padded: the image with its median colour, labels with 0.
    Cropping before resizing keeps the cost at width^2 whatever the image size.
    """
    window = max(1, int(round(width / scale)))
    height, wide = labels.shape
    pad_y, pad_x = max(0, window - height), max(0, window - wide)
    if pad_y or pad_x:
        top, left = pad_y // 2, pad_x // 2
        fill = [int(v) for v in np.median(image.reshape(-1, 3), axis=0)]
        image = cv2.copyMakeBorder(image, top, pad_y - top, left, pad_x - left,
                                   cv2.BORDER_CONSTANT, value=fill)
        labels = cv2.copyMakeBorder(labels, top, pad_y - top, left, pad_x - left,
                                    cv2.BORDER_CONSTANT, value=0)
        height, wide = labels.shape
    y = int(rng.integers(0, height - window + 1))
    x = int(rng.integers(0, wide - window + 1))
    image = image[y:y + window, x:x + window]
    labels = labels[y:y + window, x:x + window]
    if window != width:
        image = cv2.resize(image, (width, width), interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, (width, width), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, labels


def scaled_crop(image: np.ndarray, labels: np.ndarray, width: int, scale: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`random_crop` for any scale, at a cost bounded by the output and the image, not the window.

    The window (side width / scale) is drawn exactly as `random_crop` draws it, but the image is
    never padded to the window's size: only the part of the window inside the image is resized,
    with area averaging when it shrinks (no aliasing), and placed on a width x width canvas of the
    image's median colour (labels 0). A sample whose nuclei are eight times the target size is
    shrunk eight times; a padded window would be 64 times the output's pixels.
    """
    window = max(1, int(round(width / scale)))
    height, wide = labels.shape
    pad_y, pad_x = max(0, window - height), max(0, window - wide)
    y = int(rng.integers(0, height + pad_y - window + 1)) - pad_y // 2  # window origin in the image
    x = int(rng.integers(0, wide + pad_x - window + 1)) - pad_x // 2
    y0, y1 = max(y, 0), min(y + window, height)
    x0, x1 = max(x, 0), min(x + window, wide)
    step = width / window  # output pixels per image pixel
    top, bottom = int(round((y0 - y) * step)), int(round((y1 - y) * step))
    left, right = int(round((x0 - x) * step)), int(round((x1 - x) * step))
    out_image = np.empty((width, width, 3), np.uint8)
    if (top, left, bottom, right) != (0, 0, width, width):  # some of the window lies outside
        out_image[:] = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    out_labels = np.zeros((width, width), labels.dtype)
    if bottom > top and right > left:
        size = (right - left, bottom - top)
        part, part_labels = image[y0:y1, x0:x1], labels[y0:y1, x0:x1]
        if size != (x1 - x0, y1 - y0):
            shrink = size[0] * size[1] < (x1 - x0) * (y1 - y0)
            part = cv2.resize(part, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            part_labels = cv2.resize(part_labels, size, interpolation=cv2.INTER_NEAREST_EXACT)
        out_image[top:bottom, left:right] = part
        out_labels[top:bottom, left:right] = part_labels
    return out_image, out_labels


# the largest shrink factor of `[pre] resolution_jitter`: nuclei of a third of nucleus_diameter
# (about 7 pixels for the default 20) are enlarged by 3 at prediction
RESOLUTION_JITTER_MAX = 3.0


def lose_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """The image shrunk by `factor` (area averaging) and enlarged back to its size (bilinear): what
    prediction's `inference.rescale_image` gives for an image captured `factor` times smaller."""
    height, width = image.shape[:2]
    small = (max(1, int(round(width / factor))), max(1, int(round(height / factor))))
    if small == (width, height):
        return image
    shrunk = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    return cv2.resize(shrunk, (width, height), interpolation=cv2.INTER_LINEAR)


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """float32 Gaussian noise smoothed with a Gaussian of `sigma` pixels, scaled to a standard
    deviation of 1: the grain of the textures below."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def texture_nuclei(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image with granular dark texture inside every nucleus, as chromatin looks in stained
    tissue: within each nucleus eroded by one pixel (its rim stays as bright as it was), pixels are
    dimmed by up to a random depth (0.3 to 0.7) following Gaussian-smoothed noise of a random grain
    (sigma 0.8 to 2 pixels). Nuclei are bright on dark in every prepared view; background and rims
    are unchanged."""
    inside = cv2.erode((labels > 0).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if not inside.any():
        return image
    grain, depth = rng.uniform(0.8, 2.0), rng.uniform(0.3, 0.7)
    field = smooth_noise(labels.shape, grain, rng)
    dim = 1.0 - depth * np.clip(0.5 + 0.5 * field, 0.0, 1.0)
    out = image.astype(np.float32)
    out[inside] *= dim[inside][:, None] if out.ndim == 3 else dim[inside]
    return np.clip(np.rint(out), 0, 255).astype(image.dtype)


def texture_background(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image seen through a faint textured layer, as nuclei lie in the stroma and cytoplasm of
    stained tissue. The layer is Gaussian-smoothed noise, a fine grain (sigma 1 to 3 pixels) over
    patches (sigma 16), scaled to at most a random level (0.1 to 0.4 of full brightness); it is
    blended in as a screen, 1 - (1 - image)(1 - layer), which lifts a dark background most and a
    bright nucleus least: the background gets texture and the contrast falls. The labels are
    neither needed nor changed; nuclei are bright on dark in every prepared view."""
    shape = image.shape[:2]
    grain, level = rng.uniform(1.0, 3.0), rng.uniform(0.1, 0.4)
    field = 0.5 + 0.15 * smooth_noise(shape, grain, rng) + 0.3 * smooth_noise(shape, 16.0, rng)
    layer = level * np.clip(field, 0.0, 1.0)
    if image.ndim == 3:
        layer = layer[..., None]
    out = 255.0 - (255.0 - image.astype(np.float32)) * (1.0 - layer)
    return np.clip(np.rint(out), 0, 255).astype(image.dtype)


def stretch(image: np.ndarray, labels: np.ndarray, factor: float,
            angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Both stretched `factor` times along the direction `angle` (radians from the x axis) about the
    crop's centre, the size across that direction kept: round nuclei come out elongated, as the
    spindle-shaped nuclei of tissue sections are. Reflected at the borders, as `elastic` is."""
    height, width = labels.shape
    u = np.array([np.cos(angle), np.sin(angle)], np.float32)
    inverse = np.eye(2, dtype=np.float32) + (1.0 / factor - 1.0) * np.outer(u, u)  # output -> input
    centre = np.array([(width - 1) / 2, (height - 1) / 2], np.float32)
    grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)), -1)
    source = (grid - centre) @ inverse.T + centre
    map_x, map_y = np.ascontiguousarray(source[..., 0]), np.ascontiguousarray(source[..., 1])
    image = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    labels = cv2.remap(labels, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return image, labels


def elastic(image: np.ndarray, labels: np.ndarray, alpha: float, sigma: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement field (Gaussian-filtered noise, scaled by alpha) applied to both."""
    height, width = labels.shape
    dx, dy = (cv2.GaussianBlur(rng.uniform(-1, 1, (height, width)).astype(np.float32), (0, 0), sigma)
              for _ in range(2))
    # normalise so that alpha is the largest displacement in pixels, independent of sigma
    peak = max(np.abs(dx).max(), np.abs(dy).max(), 1e-6)
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x = grid_x + dx * (alpha / peak)
    map_y = grid_y + dy * (alpha / peak)
    image = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    # int32 label maps are remapped exactly with nearest neighbour; reflecting keeps ids consistent
    labels = cv2.remap(labels, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return image, labels


def flip_rotate(image: np.ndarray, labels: np.ndarray, flip: bool, rotate: bool,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if flip and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if flip and rng.random() < 0.5:
        image, labels = image[::-1], labels[::-1]
    if rotate:
        k = int(rng.integers(0, 4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


class Augmenter:
    """Random training augmentation built from a `[pre]` section.

    `geometric(image, labels, rng, colour)` takes RGB uint8 (H, W, 3) and int32 labels (H, W) and
    returns a width x width pair (it also draws `nucleus_texture`, which needs the labels, and then
    `background_texture`); `photometric(image, rng)` returns float32 (3, width, width) in [0, 1].
    Both expect an image already through `prepare_image`.
    """

    def __init__(self, pre: PreConfig):
        self.pre = pre

    @cached_property
    def colour(self):
        """The torchvision colour pipeline of `[pre]` (None when every colour switch is off), built
        on first use so that geometry alone never imports torch."""
        from torchvision.transforms import v2
        pre = self.pre
        colour = []
        if pre.color_jitter:
            colour.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
        if pre.channel_shuffle:
            colour.append(v2.RandomChannelPermutation())
        if pre.grayscale > 0:
            colour.append(v2.RandomGrayscale(p=pre.grayscale))
        if pre.color_invert:
            colour.append(v2.RandomInvert(p=0.5))
        return v2.Compose(colour) if colour else None

    def geometric(self, image, labels, rng: np.random.Generator, colour: bool = True):
        """`colour`: whether the sample was a colour image before `prepare_image` (it matters only
        with `nucleus_texture_on = colour`)."""
        pre = self.pre
        scale = float(np.exp(rng.uniform(np.log(pre.rescale_min), np.log(pre.rescale_max)))) if pre.rescale else 1.0
        if pre.size_norm:
            # the random rescale becomes a jitter around the sample's normalised nucleus size
            scale *= size_factor(median_diameter(labels), pre.nucleus_diameter)
            image, labels = scaled_crop(image, labels, pre.width, scale, rng)
        else:
            image, labels = random_crop(image, labels, pre.width, scale, rng)
        if pre.resolution_jitter > 0 and rng.random() < pre.resolution_jitter:
            image = lose_resolution(image, float(np.exp(rng.uniform(0.0, np.log(RESOLUTION_JITTER_MAX)))))
        if pre.aspect_jitter > 1:
            factor = float(np.exp(rng.uniform(0.0, np.log(pre.aspect_jitter))))
            image, labels = stretch(image, labels, factor, float(rng.uniform(0.0, np.pi)))
        if pre.elastic and pre.elastic_alpha > 0:
            image, labels = elastic(image, labels, pre.elastic_alpha, pre.elastic_sigma, rng)
        if pre.nucleus_texture > 0 and rng.random() < pre.nucleus_texture and (colour or pre.nucleus_texture_on == "all"):
            image = texture_nuclei(image, labels, rng)
        if pre.background_texture > 0 and rng.random() < pre.background_texture:
            image = texture_background(image, rng)
        return flip_rotate(image, labels, pre.flip, pre.rotate, rng)

    def photometric(self, image: np.ndarray, rng: np.random.Generator):
        import torch
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        colour = self.colour
        if colour is not None:
            # torchvision draws from torch's generator: seed it from ours to stay reproducible
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(0, 2**31)))
                tensor = colour(tensor)
        out = tensor.float().div_(255.0)
        if self.pre.noise and self.pre.noise_sigma > 0:
            noise = rng.normal(0.0, self.pre.noise_sigma, out.shape).astype(np.float32)
            out = (out + torch.from_numpy(noise)).clamp_(0.0, 1.0)
        return out


def to_tensor_image(image: np.ndarray):
    """RGB uint8 (H, W, 3) -> torch float32 (3, H, W) in [0, 1]."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
