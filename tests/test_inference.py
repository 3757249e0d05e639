"""Inference: TTA views invert exactly, padding and tiles are cropped exactly, ensembles average."""
import numpy as np
import pytest
import torch

from dataset.tiles import tile_origins
from inference import Member, predict_image, taper, tta_views
from model import build_model


class PixelModel(torch.nn.Module):
    """A stand-in network whose output at a pixel depends only on that pixel's input, so every
    flip, rotation, pad and tile must give back exactly the same maps."""
    stride = 16
    heads = ("semantic", "contour")

    def predict(self, x):
        return {"semantic": torch.sigmoid(4 * x[:, :1] - 2), "contour": x[:, 1:2] * x[:, 2:3]}


def expected(image):
    return {"semantic": torch.sigmoid(4 * image[0] - 2).numpy(), "contour": (image[1] * image[2]).numpy()}


@pytest.mark.parametrize("rotations", [False, True])
def test_every_view_is_undone_exactly(rotations):
    x = torch.rand(1, 1, 8, 8)
    views = tta_views(True, rotations)
    assert len(views) == (8 if rotations else 4)
    assert all(torch.equal(inv(fwd(x)), x) for fwd, inv in views)
    assert len({fwd(x).numpy().tobytes() for fwd, _ in views}) == len(views)  # all views differ


@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (16, 90)])
@pytest.mark.parametrize("tta, rotate", [(False, False), (True, False), (True, True)])
def test_padding_is_cropped_exactly(cfg, shape, tta, rotate):
    image = torch.rand(3, *shape)
    valid = cfg.replace("valid", test_time_augment=tta, tta_rotate=rotate).valid
    out = predict_image([PixelModel()], image, valid, width=64)
    for k, v in expected(image).items():
        assert out[k].shape == shape
        np.testing.assert_allclose(out[k], v, atol=1e-6)


def test_tiles_blend_to_the_untiled_result(cfg):
    image = torch.rand(3, 150, 200)
    valid = cfg.replace("valid", tile_size=64, tile_overlap=16, test_time_augment=False).valid
    out = predict_image([PixelModel()], image, valid, width=64)
    for k, v in expected(image).items():
        np.testing.assert_allclose(out[k], v, atol=1e-6)
    assert tile_origins(200, 64, 48) == [0, 48, 96, 136] and tile_origins(50, 64, 48) == [0]
    w = taper(64, 64, 16)
    assert w[32, 32] == 1 and w[0, 0] > 0 and w[0, 32] < 1


def test_resize_mode_restores_the_size(cfg):
    image = torch.rand(3, 70, 90)
    out = predict_image([PixelModel()], image, cfg.replace("valid", pred_orig_size=False).valid, width=64)
    assert out["semantic"].shape == (70, 90)


def net(cfg, name, seed):
    torch.manual_seed(seed)
    return build_model(cfg.replace("model", model=name, encoder="plain", n_filter=4).model).eval()


def test_ensemble_of_one_model_twice_equals_the_model(cfg):
    model = net(cfg, "camunet", 0)
    image = torch.rand(3, 40, 56)
    once = predict_image([model], image, cfg.valid, 64)
    twice = predict_image([model, model], image, cfg.valid, 64)
    assert set(once) == {"semantic", "contour", "marker"}
    for k in once:
        np.testing.assert_allclose(twice[k], once[k], atol=1e-6)


def test_mixed_models_average_the_heads_they_have(cfg):
    unet, camunet = net(cfg, "unet", 1), net(cfg, "camunet", 2)
    image = torch.rand(3, 32, 32)
    a = predict_image([unet], image, cfg.valid, 64)
    b = predict_image([camunet], image, cfg.valid, 64)
    both = predict_image([unet, camunet], image, cfg.valid, 64)
    np.testing.assert_allclose(both["semantic"], (a["semantic"] + b["semantic"]) / 2, atol=1e-6)
    np.testing.assert_allclose(both["marker"], b["marker"], atol=1e-6)
    vote = predict_image([unet, camunet], image, cfg.replace("valid", ensemble="vote").valid, 64)
    assert set(np.unique(vote["semantic"])) <= {0.0, 0.5, 1.0}


def test_uint8_images_are_accepted(cfg):
    image = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    out = predict_image([PixelModel()], image, cfg.valid, 64)
    np.testing.assert_allclose(out["semantic"], expected(torch.from_numpy(image).permute(2, 0, 1) / 255.0)["semantic"],
                               atol=1e-6)


class Recording(PixelModel):
    """PixelModel that records the (batch, height, width) of every input it is given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def predict(self, x):
        self.calls.append(tuple(x.shape[:1] + x.shape[2:]))
        return super().predict(x)


def bright_disks(diameter, shape):
    """A float (3, H, W) image of bright disks on black, a grid of them one diameter apart."""
    from tests.conftest import disk
    mask = np.zeros(shape, bool)
    for y in range(diameter, shape[0] - diameter // 2, 2 * diameter):
        for x in range(diameter, shape[1] - diameter // 2, 2 * diameter):
            mask |= disk(shape, (y, x), diameter / 2)
    return torch.from_numpy(np.repeat(mask[None].astype(np.float32), 3, 0))


def padded(n, stride=16):
    return n + -n % stride


@pytest.mark.parametrize("diameter, scale, factor", [(40, 1.0, 0.5), (10, 1.0, 2.0), (40, 1.5, 0.75)])
def test_size_norm_predicts_at_the_target_size_and_returns_maps_at_the_image_size(cfg, diameter, scale, factor):
    # the target is [pre] nucleus_diameter x [valid] diameter_scale: 20 or 30 pixels here
    shape = (200, 240)
    image = bright_disks(diameter, shape)
    pre = cfg.replace("pre", size_norm=True, nucleus_diameter=20).pre
    valid = cfg.replace("valid", diameter_scale=(scale,)).valid
    model, sizes = Recording(), {}
    out = predict_image([Member(model, pre, "sized")], image, valid, sizes=sizes)
    estimated, used = sizes["sized"]
    assert estimated == pytest.approx(diameter, rel=0.06) and used == pytest.approx(factor, rel=0.06)
    # estimation passes without TTA (batch of one), then the four flip views at the rescaled size
    first, *_, last = model.calls
    assert first == (1, padded(200), padded(240))
    h, w = round(200 * used), round(240 * used)
    assert last == (4, padded(h), padded(w)) and all(c[0] == 1 for c in model.calls[:-1])
    # the maps come back at the image's own size, in place: the pixel model's maps of the image up to
    # resampling at the edges
    for k, v in expected(image).items():
        assert out[k].shape == shape
        found, truth = out[k] > 0.5, v > 0.5
        assert (found & truth).sum() / (found | truth).sum() > 0.9


def test_several_diameter_scales_predict_at_each_size_and_average_the_maps(cfg):
    # nuclei 40 pixels across, targets 20 and 30: factors 0.5 and 0.75, each with the four flips
    shape = (200, 240)
    image = bright_disks(40, shape)
    pre = cfg.replace("pre", size_norm=True, nucleus_diameter=20).pre
    model, sizes = Recording(), {}
    out = predict_image([Member(model, pre, "m")], image, cfg.replace("valid", diameter_scale=(1.0, 1.5)).valid,
                        sizes=sizes)
    estimated, first = sizes["m"]
    assert first == pytest.approx(0.5, rel=0.06)  # the factor of the first scale is reported
    four = [c for c in model.calls if c[0] == 4]
    assert four == [(4, padded(round(200 * first)), padded(round(240 * first))),
                    (4, padded(round(200 * 0.75 * 40 / estimated)), padded(round(240 * 0.75 * 40 / estimated)))]
    # the average of the two single-scale predictions at those factors, at the image's size
    from inference import predict_normalised
    single = [predict_normalised(Recording(), image, cfg.valid, pre.width, target, factor=target / estimated)[0]
              for target in (20, 30)]
    for k in out:
        np.testing.assert_allclose(out[k], ((single[0][k] + single[1][k]) / 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("passes, looks", [(1, 1), (3, 2)])
def test_size_passes_caps_the_estimation_passes(cfg, passes, looks):
    # 40-pixel nuclei against a 20-pixel target: the first pass measures them, a second one (at half
    # the size) finds them at the target and stops; with one pass the first estimate stands
    image = bright_disks(40, (120, 160))
    pre = cfg.replace("pre", size_norm=True, nucleus_diameter=20).pre
    model, sizes = Recording(), {}
    predict_image([Member(model, pre, "m")], image, cfg.replace("valid", size_passes=passes).valid, sizes=sizes)
    assert sum(call[0] == 1 for call in model.calls) == looks  # estimation passes run without TTA
    assert sizes["m"][0] == pytest.approx(40, rel=0.1)


def test_size_passes_needs_one_at_least(tmp_path):
    from config import ConfigError, load_config
    (tmp_path / "c.ini").write_text("[valid]\nsize_passes = 0\n")
    with pytest.raises(ConfigError, match="c.ini.*\\[valid\\] size_passes"):
        load_config(tmp_path / "c.ini", user_path=None)


def test_diameter_scale_needs_a_number(tmp_path):
    from config import ConfigError, load_config
    (tmp_path / "c.ini").write_text("[valid]\ndiameter_scale =\n")
    with pytest.raises(ConfigError, match="c.ini: \\[valid\\] diameter_scale needs at least one number"):
        load_config(tmp_path / "c.ini", user_path=None)


def test_a_size_normalised_member_ensembles_with_a_plain_one(cfg):
    image = bright_disks(40, (120, 160))
    sized = Member(Recording(), cfg.replace("pre", size_norm=True).pre, "sized")
    plain = Member(Recording(), cfg.pre, "plain")
    sizes = {}
    both = predict_image([sized, plain], image, cfg.valid, sizes=sizes)
    alone = predict_image([plain], image, cfg.valid)
    assert set(sizes) == {"sized"} and plain.model.calls[-1] == (4, 128, 160)  # the plain one at 1:1
    assert both["semantic"].shape == (120, 160)
    # the plain member's share is exact; the sized member's maps differ only by resampling at the edges
    sized_share = 2 * both["semantic"] - alone["semantic"]
    np.testing.assert_allclose(alone["semantic"], expected(image)["semantic"], atol=1e-6)
    assert np.abs(sized_share - alone["semantic"]).mean() < 0.02


def test_an_image_without_nuclei_is_predicted_as_it_is(cfg):
    image = torch.zeros(3, 64, 80)
    model, sizes = Recording(), {}
    out = predict_image([Member(model, cfg.replace("pre", size_norm=True).pre, "m")], image, cfg.valid, sizes=sizes)
    assert sizes["m"] == (None, 1.0) and model.calls == [(1, 64, 80), (4, 64, 80)]
    np.testing.assert_allclose(out["semantic"], expected(image)["semantic"], atol=1e-6)


def test_size_norm_refuses_the_resize_to_width(cfg):
    from config import InputError
    member = Member(PixelModel(), cfg.replace("pre", size_norm=True).pre, "ckpt.pkl")
    with pytest.raises(InputError, match="ckpt.pkl was trained with \\[pre\\] size_norm.*pred_orig_size = True"):
        predict_image([member], torch.rand(3, 32, 32), cfg.replace("valid", pred_orig_size=False).valid)


class WindowModel(PixelModel):
    """A stand-in network with a limited window: a bright blob that holds a `window`-pixel square is
    too large for it to see whole, and it marks only a sparse grid of 16-pixel squares on it
    (fragments about the size of a usual nucleus, a ninth of the blob); smaller blobs it marks
    whole. The grid is fixed in the input's pixels, whatever the scale the image is given at."""
    window = 33
    period, square = 48, 16

    def predict(self, x):
        bright = (x[:, :1] > 0.5).float()
        pool = torch.nn.functional.max_pool2d
        eroded = -pool(-bright, self.window, stride=1, padding=self.window // 2)
        large = pool(eroded, self.window, stride=1, padding=self.window // 2) > 0.5
        h, w = x.shape[-2:]
        rows, cols = torch.arange(h)[:, None] % self.period, torch.arange(w)[None] % self.period
        grid = ((rows < self.square) & (cols < self.square)).float()
        semantic = torch.where(large, grid, bright)
        return {"semantic": semantic.clamp(0.02, 0.98), "contour": torch.zeros_like(semantic)}


@pytest.mark.parametrize("diameter", [120, 16])
def test_nuclei_too_large_for_the_window_are_measured_at_a_coarser_view(cfg, diameter):
    # at its own scale the image of 120-pixel nuclei shows the network only nucleus-sized fragments,
    # which the passes used to take for nuclei of about the target size (the old estimate: 12
    # pixels); half and a quarter of the size show them whole. Nuclei the
    # network sees whole at the image's own scale are measured there, as before.
    image = bright_disks(diameter, (480, 480))
    pre = cfg.replace("pre", size_norm=True, nucleus_diameter=20).pre
    sizes = {}
    predict_image([Member(WindowModel(), pre, "m")], image, cfg.valid, sizes=sizes)
    estimated, factor = sizes["m"]
    assert estimated == pytest.approx(diameter, rel=0.1)
    assert factor == pytest.approx(20 / diameter, rel=0.1)


class FillingWindowModel(WindowModel):
    """As WindowModel, but the fragments tile a blob too large for the window with two-pixel gaps:
    the network marks almost as much of the image as nucleus as a view that sees the blob whole."""
    period, square = 16, 14


def test_fragments_that_fill_a_nucleus_are_not_taken_for_nuclei(cfg):
    # the share of the image marked is about the same at every view, so the session-14 rule (the
    # finest view that marks about as much as the most) measured the 15-pixel fragments at the
    # image's own scale; the estimate in image pixels doubles from each fragment view to the next
    # coarser, while the two views that see the nuclei whole agree on 120
    image = bright_disks(120, (600, 600))
    pre = cfg.replace("pre", size_norm=True, nucleus_diameter=20).pre
    sizes = {}
    predict_image([Member(FillingWindowModel(), pre, "m")], image, cfg.valid, sizes=sizes)
    estimated, factor = sizes["m"]
    assert estimated == pytest.approx(120, rel=0.1)
    assert factor == pytest.approx(20 / 120, rel=0.1)


def _scripted_looks(monkeypatch, first, further):
    """inference._look replaced: the first pass's views by factor from `first`, every further pass `further`."""
    import inference
    calls = []

    def look(model, image, valid, width, factor):
        calls.append(factor)
        return first.get(factor, further)
    monkeypatch.setattr(inference, "_look", look)
    return calls


@pytest.mark.parametrize("further, diameter", [
    # the pass at the first estimate's scale marks a fifth of what the chosen view marked: fragments,
    # so the first view's estimate (22.9 px at half size: 45.8) stands
    ((7.8, 0.10, 0.655), 45.8),
    # a pass that marks about as much is followed: 29 px at 0.655
    ((29.0, 0.45, 0.655), 29.0 / 0.655),
])
def test_a_further_pass_that_sees_fragments_is_not_followed(cfg, monkeypatch, further, diameter):
    from inference import estimate_scale
    # large textured nuclei: fragments at the image's own scale, whole at half, merged at a quarter
    first = {1.0: (13.0, 0.17, 1.0), 0.5: (22.9, 0.49, 0.5), 0.25: (20.9, 0.59, 0.25)}
    calls = _scripted_looks(monkeypatch, first, further)
    image = torch.zeros(3, 256, 320)
    found, factor = estimate_scale(None, image, cfg.replace("valid", size_passes=3).valid, 256, target=30.0)
    assert found == pytest.approx(diameter, rel=1e-3)
    assert calls[:3] == [1.0, 0.5, 0.25] and calls[3] == pytest.approx(30.0 / 45.8, rel=1e-3)


def test_after_the_images_own_view_a_pass_that_marks_less_is_followed(cfg, monkeypatch):
    from inference import estimate_scale
    # small faint nuclei: the image's own view sees them (8 px, a little marked), the coarser views
    # see nothing whole; the pass at the scale asked for marks less but sees them at 5 px, and is followed
    first = {1.0: (8.0, 0.20, 1.0), 0.5: (None, 0.0, 0.5), 0.25: (None, 0.0, 0.25)}
    _scripted_looks(monkeypatch, first, (5.0 * 3.75, 0.05, 3.75))
    image = torch.zeros(3, 256, 320)
    found, _ = estimate_scale(None, image, cfg.replace("valid", size_passes=3).valid, 256, target=30.0)
    assert found == pytest.approx(5.0)
