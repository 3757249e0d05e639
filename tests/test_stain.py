"""Stain and modality options of [pre]: haematoxylin-eosin jitter, the haematoxylin view, brightfield
inversion, applied the same way in training and in prediction."""
import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from dataset.augment import (haematoxylin_view, hed_jitter, hed_to_rgb, invert_if_bright,
                             inverted_grey_view, prepare_image, prepare_key, rgb_to_hed, to_tensor_image)
from dataset.families import BRIGHT_MEDIAN
from dataset.io import list_samples, read_image
from tests.conftest import SAMPLE, disk, make_sample


def stained(size=48, background=(230, 225, 235)) -> np.ndarray:
    """RGB uint8: purple disks (haematoxylin-like) on a pale background, with a little noise."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    for centre in ((12, 12), (30, 34), (36, 10)):
        image[disk((size, size), centre, 6)] = (110, 50, 150)
    noise = np.random.default_rng(0).integers(-3, 4, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def grey(size=48, level=20) -> np.ndarray:
    image = np.full((size, size, 3), level, np.uint8)
    image[disk((size, size), (20, 20), 8)] = 200
    return image


def test_hed_round_trip_is_exact_to_a_grey_level():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.abs(hed_to_rgb(rgb_to_hed(image)).astype(int) - image).max() <= 1


def test_hed_jitter_keeps_shape_dtype_and_range_and_is_identity_at_zero():
    image = stained()
    out = hed_jitter(image, 0.0, np.random.default_rng(0))
    assert out is image
    for strength in (0.05, 0.2, 1.0):
        out = hed_jitter(image, strength, np.random.default_rng(3))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert 0 <= out.min() and out.max() <= 255
    # strong jitter changes a colour image, mild jitter changes it less
    change = {s: np.abs(hed_jitter(image, s, np.random.default_rng(3)).astype(int) - image).mean() for s in (0.05, 0.2)}
    assert change[0.2] > change[0.05] > 0.1
    # reproducible from the generator; grey images are left alone but the draws are the same
    assert np.array_equal(hed_jitter(image, 0.2, np.random.default_rng(5)), hed_jitter(image, 0.2, np.random.default_rng(5)))
    g = grey()
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    assert hed_jitter(g, 0.2, rng_a) is g
    hed_jitter(image, 0.2, rng_b)
    assert rng_a.random() == rng_b.random()


@pytest.mark.parametrize("view", [haematoxylin_view, inverted_grey_view])
def test_stain_views_make_nuclei_bright_on_dark_and_leave_grey_images(view):
    image = stained()
    out = view(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    nuclei = disk(image.shape[:2], (30, 34), 5)
    assert out[..., 0][nuclei].mean() > out[..., 0][~disk(image.shape[:2], (30, 34), 8)].mean() + 100
    g = grey()
    assert view(g) is g


def test_inverted_grey_view_needs_no_haematoxylin_colour():
    # brown (DAB-like) nuclei on white: less haematoxylin than the background, but darker than it
    brown = stained(background=(245, 245, 245))
    for centre in ((12, 12), (30, 34), (36, 10)):
        brown[disk(brown.shape[:2], centre, 6)] = (180, 100, 30)
    nuclei, background = disk(brown.shape[:2], (30, 34), 5), ~disk(brown.shape[:2], (30, 34), 8)
    out = inverted_grey_view(brown)[..., 0].astype(int)
    assert out[nuclei].mean() > out[background].mean() + 150
    haematoxylin = haematoxylin_view(brown)[..., 0].astype(int)
    assert haematoxylin[nuclei].mean() < haematoxylin[background].mean()


def test_invert_if_bright_inverts_brightfield_only():
    bright = 255 - grey()
    assert np.array_equal(invert_if_bright(bright), grey())
    dark = grey()
    assert invert_if_bright(dark) is dark
    colour = stained()
    assert invert_if_bright(colour) is colour


def test_a_stain_view_of_tissue_filling_the_frame_is_not_inverted_back():
    # tinted tissue over the whole frame, a small white gap and purple nuclei: the view puts the
    # tissue in the middle of the grey range, above the brightfield threshold, and invert_bright
    # used to turn the view's bright nuclei dark again; a grey brightfield image is still inverted
    tissue = stained(background=(200, 120, 180))
    tissue[:10, 38:] = 255
    nuclei, rest = disk(tissue.shape[:2], (30, 34), 5), ~disk(tissue.shape[:2], (30, 34), 8)
    pre = pre_cfg(stain_norm="inverted_grey", invert_bright=True, stretch=False).pre
    view = inverted_grey_view(tissue)
    assert np.median(view.mean(axis=2)) >= BRIGHT_MEDIAN  # what made the old rule invert it
    out = prepare_image(tissue, pre)[..., 0].astype(int)
    assert out[nuclei].mean() > out[rest].mean() + 20
    bright = 255 - grey()
    assert np.array_equal(prepare_image(bright, pre), grey())


def pre_cfg(**pre):
    cfg = load_config(user_path=None)
    return cfg.replace("pre", **pre)


def test_prepare_key_tells_the_stain_settings_apart():
    a = pre_cfg(stretch=True).pre
    assert prepare_key(a) != prepare_key(pre_cfg(stretch=True, stain_norm="hematoxylin").pre)
    assert prepare_key(a) != prepare_key(pre_cfg(stretch=True, invert_bright=True).pre)
    assert prepare_key(pre_cfg(stain_norm="inverted_grey").pre) != prepare_key(pre_cfg(stain_norm="hematoxylin").pre)
    assert prepare_key(a) == prepare_key(pre_cfg(stretch=True, stain_jitter=0.2).pre)  # jitter: training only


@pytest.mark.parametrize("stain_norm, invert", [("hematoxylin", False), ("hematoxylin", True), ("off", True),
                                               ("inverted_grey", False)])
def test_normalisation_is_the_same_in_training_and_prediction(tmp_path, stain_norm, invert):
    from dataset.torch_data import NucleiDataset
    from inference import Member, member_input
    # a real colour image of the sample and a synthetic brightfield one
    root = tmp_path / "data"
    colour = next(s for s in list_samples(SAMPLE) if read_image(s.image_path).std(axis=2).mean() > 1)
    (root).mkdir()
    (root / colour.id).symlink_to(colour.folder.resolve())
    make_sample(root, "bright", 255 - grey(64), [disk((64, 64), (20, 20), 8)])
    samples = list_samples(root)
    cfg = pre_cfg(stain_norm=stain_norm, invert_bright=invert, stretch=True).replace("dataset", cache_dir=None)
    # training: no geometry or colour changes, a crop the size of the image, so the input is comparable
    side = 64
    train_cfg = cfg.replace("pre", rescale=False, flip=False, rotate=False, elastic=False, color_jitter=False,
                            channel_shuffle=False, grayscale=0.0, width=side)
    member = Member(torch.nn.Identity(), cfg.pre)
    for index, sample in enumerate(samples):
        image = read_image(sample.image_path)
        predicted = member_input(member, image)
        assert torch.equal(NucleiDataset(samples, cfg, augment=False)[index]["image"], predicted)
        assert torch.equal(predicted, to_tensor_image(prepare_image(image, cfg.pre)))
        if image.shape[:2] == (side, side):
            assert torch.equal(NucleiDataset(samples, train_cfg, augment=True)[index]["image"], predicted)
        changed = not torch.equal(predicted, to_tensor_image(prepare_image(image, cfg.replace(
            "pre", stain_norm="off", invert_bright=False).pre)))
        is_colour = sample.id == colour.id
        assert changed == ((is_colour and stain_norm != "off") or (not is_colour and invert))


@pytest.mark.parametrize("stain_norm", ["off", "inverted_grey"])  # (the haematoxylin view's stretch undoes most of it)
def test_training_jitters_colour_images_only_when_asked(tmp_path, stain_norm):
    from dataset.torch_data import NucleiDataset
    root = tmp_path / "data"
    root.mkdir()
    masks = [disk((64, 64), centre, 6) for centre in ((12, 12), (30, 34), (36, 10))]
    tissue = stained(64)
    tissue[40:, :] = (225, 140, 190)  # eosin-pink cytoplasm: a third tone, whose grey the jitter moves
    make_sample(root, "colour", tissue, masks)
    make_sample(root, "grey", grey(64), [disk((64, 64), (20, 20), 8)])
    samples = list_samples(root)
    base = dict(rescale=False, flip=False, rotate=False, elastic=False, color_jitter=False, channel_shuffle=False,
                grayscale=0.0, width=64, stretch=True, stain_norm=stain_norm)
    plain_cfg = pre_cfg(**base).replace("dataset", cache_dir=None)
    jitter_cfg = pre_cfg(**base, stain_jitter=0.2).replace("dataset", cache_dir=None)
    for index, sample in enumerate(samples):
        shifts = []
        for epoch in range(4):
            plain_data, jitter_data = NucleiDataset(samples, plain_cfg, augment=True), NucleiDataset(samples, jitter_cfg, augment=True)
            plain_data.set_epoch(epoch)
            jitter_data.set_epoch(epoch)
            plain, jittered = plain_data[index], jitter_data[index]
            assert torch.equal(plain["labels"], jittered["labels"])  # the jitter leaves the geometry alone
            shifts.append(float((jittered["image"] - plain["image"]).abs().mean()))
            if stain_norm != "off":  # jittered before the view: the network still sees a grey view
                assert torch.equal(jittered["image"][0], jittered["image"][1])
                assert torch.equal(jittered["image"][1], jittered["image"][2])
        if sample.id == "grey":
            assert max(shifts) == 0
            continue
        assert max(shifts) > 0.01  # several grey levels on average, in some epoch
        # prediction never jitters
        assert torch.equal(NucleiDataset(samples, jitter_cfg, augment=False)[index]["image"],
                           NucleiDataset(samples, plain_cfg, augment=False)[index]["image"])


def test_stain_settings_are_checked(tmp_path):
    for text, match in (("[pre]\nstain_norm = macenko\n", "stain_norm"), ("[pre]\nstain_jitter = 1.5\n", "stain_jitter"),
                        ("[pre]\nresolution_jitter = -0.1\n", "resolution_jitter"),
                        ("[pre]\naspect_jitter = 0.5\n", "aspect_jitter"),
                        ("[pre]\nnucleus_texture = 1.5\n", "nucleus_texture"),
                        ("[pre]\nnucleus_texture_on = grey\n", "nucleus_texture_on"),
                        ("[pre]\nbackground_texture = -0.1\n", "background_texture"),
                        ("[train]\nbalance_group = True\nbalance_family = True\n", "balance_family")):
        path = tmp_path / "bad.ini"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(path, user_path=None)


def test_view_contrast_bench_measures_each_view_on_the_named_family(tmp_path, capsys):
    import bench.view_contrast as view_contrast
    root = tmp_path / "data"
    root.mkdir()
    for index in range(2):
        masks = [disk((48, 48), centre, 6) for centre in ((12, 12), (30, 34), (36, 10))]
        make_sample(root, f"white{index}", stained(background=(235, 232, 238)), masks)
    scores = view_contrast.main([str(root), "--families", "colour_white"])
    assert set(scores) == {"colour_white"}
    for view in ("stain_norm = hematoxylin", "stain_norm = inverted_grey"):
        assert len(scores["colour_white"][view]) == 2 and min(scores["colour_white"][view]) > 3
    out = capsys.readouterr().out
    assert "colour_white (2 colour images)" in out
    assert "inverted_grey views with a median of 100 or more: 0 of 2" in out  # white background: dark view
    # tissue filling the frame (the invert_bright test's image): its view is counted
    tissue_root = tmp_path / "tissue"
    tissue_root.mkdir()
    tissue = stained(background=(200, 120, 180))
    tissue[:10, 38:] = 255
    make_sample(tissue_root, "tissue", tissue[..., ::-1].copy(), [disk((48, 48), (30, 34), 5)])
    family = next(iter(view_contrast.sample_families(list_samples(tissue_root)).values()))
    view_contrast.main([str(tissue_root), "--families", family])
    assert "inverted_grey views with a median of 100 or more: 1 of 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no image of family colour_tinted"):
        view_contrast.main([str(root), "--families", "colour_tinted"])
    grey_root = tmp_path / "grey"
    grey_root.mkdir()
    make_sample(grey_root, "grey", grey(48), [disk((48, 48), (20, 20), 8)])
    with pytest.raises(SystemExit, match="family fluorescence_small .* has no colour image"):
        view_contrast.main([str(grey_root), "--families", "fluorescence_small"])
