"""The memory cap picks the tile size: the largest multiple of the stride that fits, smaller caps
giving smaller tiles; predictions under a cap go through the same tiled inference path."""
import dataclasses
import gc

import numpy as np
import pytest
import torch

from config import InputError, load_config
from inference import Member, predict_image
from model import build_model
import tile_budget
from tile_budget import MB, CappedPredictor, LiveTensors, TileBudget, measure_budget, tile_peak_bytes


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(user_path=None)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, model="caunet", encoder="plain", n_filter=4)).eval()
    return cfg, model


def test_tile_for_is_the_largest_stride_multiple_under_the_cap():
    budget = TileBudget(cap=10 * MB, fixed=MB, intercept=0, bytes_per_pixel=100.0,
                        image_bytes_per_pixel=8.0, stride=16)
    # free for the tile: 9 MiB - 8 bytes * 500 * 400 = 7837184 bytes; sqrt(7837184 / 100) = 279.9
    assert budget.tile_for(500, 400) == 272
    sides = [dataclasses.replace(budget, cap=cap * MB).tile_for(500, 400) for cap in (4, 10, 40, 160)]
    assert sides == sorted(sides) and len(set(sides)) == 4 and all(s % 16 == 0 for s in sides)
    # a bigger image leaves less room for the tile
    assert budget.tile_for(1000, 1000) < budget.tile_for(500, 400)


def test_a_cap_below_the_weights_and_buffers_is_one_line():
    budget = TileBudget(cap=2 * MB, fixed=MB, intercept=0, bytes_per_pixel=100.0,
                        image_bytes_per_pixel=40.0, stride=32)
    with pytest.raises(InputError, match=r"max_memory_mb = 2: a 300x200 image needs at least \d+ MB"):
        budget.tile_for(200, 300)


def test_live_tensors_count_shared_storage_once_and_free_it():
    live = LiveTensors()
    a = torch.zeros(1000)                 # 4000 bytes
    live.add(a)
    view = a[:10]
    live.add(view)                        # same storage
    b = torch.zeros(500)
    live.add(b)
    assert live.current == 6000 and live.peak == 6000
    del a
    gc.collect()
    assert live.current == 6000           # the view still holds the storage
    del view, b
    gc.collect()
    assert live.current == 0 and live.peak == 6000


def test_the_estimate_grows_with_the_tile_area(tiny):
    cfg, model = tiny
    with torch.inference_mode():
        small, large = (tile_peak_bytes(model, side, cfg.valid, "cpu") for side in (32, 64))
    assert small > 0 and large / small == pytest.approx(4, rel=0.1)
    # 4 TTA views of a 64x64 tile: at least the input batch and the two heads' maps are alive
    assert large > 4 * 3 * 64 * 64 * 4 + 2 * 64 * 64 * 4


def test_measured_budget_picks_smaller_tiles_for_smaller_caps(tiny):
    cfg, model = tiny
    budget = measure_budget([Member(model)], cfg.valid, "cpu", 64)
    assert budget.stride == model.stride and budget.bytes_per_pixel > 0 and budget.image_bytes_per_pixel == 4 * 8
    sides = [dataclasses.replace(budget, cap=cap * MB).tile_for(1000, 1000) for cap in (48, 64, 128, 256)]
    assert sides == sorted(sides) and sides[0] < sides[-1]
    assert all(side % model.stride == 0 for side in sides)


def test_prediction_under_a_cap_equals_prediction_with_that_tile_size(tiny):
    cfg, model = tiny
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 130, 3), dtype=np.uint8)
    budget = TileBudget(cap=MB, fixed=0, intercept=0, bytes_per_pixel=40.0, image_bytes_per_pixel=8.0, stride=16)
    valid = budget.valid_for(cfg.valid, 150, 130)
    assert valid.tile_size < 150 and valid.tile_overlap <= valid.tile_size // 4
    capped = predict_image([Member(model)], image, valid)
    fixed = predict_image([Member(model)], image,
                          dataclasses.replace(cfg.valid, tile_size=valid.tile_size, tile_overlap=valid.tile_overlap))
    for head in capped:
        assert capped[head].shape == (150, 130) and np.array_equal(capped[head], fixed[head])


class FakeDevice:
    """A device whose allocator peaks at the weights and image buffers plus `slope` bytes a pixel of
    the tile that ran: `true_slope` higher than the probes' fit, as on the GPU where the cap failed."""

    def __init__(self, budget, true_slope, monkeypatch):
        self.budget, self.true_slope, self.sides = budget, true_slope, []
        real = tile_budget.predict_image

        def spy(members, image, valid, **kw):
            self.sides.append(valid.tile_size)
            self.shape = image.shape[:2]
            return real(members, image, valid, **kw)
        monkeypatch.setattr(tile_budget, "predict_image", spy)

    def measure(self, call):
        out = call()
        h, w = self.shape
        side = self.sides[-1]
        b = self.budget
        peak = b.fixed + b.image_bytes_per_pixel * h * w + b.intercept + self.true_slope * min(side, h) * min(side, w)
        return out, int(peak), int(peak) + 1000


def test_a_peak_over_the_cap_shrinks_the_tile_and_predicts_again(tiny, monkeypatch):
    cfg, model = tiny
    image = np.random.default_rng(1).integers(0, 255, (200, 180, 3), dtype=np.uint8)
    budget = TileBudget(cap=2 * MB, fixed=MB, intercept=0, bytes_per_pixel=40.0, image_bytes_per_pixel=8.0,
                        stride=16)
    fake = FakeDevice(budget, true_slope=60.0, monkeypatch=monkeypatch)  # the fit is 1.5x too low
    predictor = CappedPredictor(budget, [Member(model)], "cpu", measure=fake.measure)
    probs, used = predictor(image, cfg.valid)
    first, second = fake.sides
    assert first == budget.tile_for(200, 180) and second < first
    assert used.tile_size == second and predictor.peak_allocated > budget.cap
    assert predictor.corrections == [((200, 180), predictor.peak_allocated, first, second)]
    # what came back is the prediction with the smaller tile, and it fits under the cap
    assert fake.measure(lambda: None)[1] <= budget.cap
    again = predict_image([Member(model)], image, used)
    assert all(np.array_equal(probs[k], again[k]) for k in probs)
    # the next image starts from the corrected fit: one run, no correction
    fake.sides.clear()
    predictor(image, cfg.valid)
    assert fake.sides == [second] and len(predictor.corrections) == 1


def test_the_correction_shrinks_a_whole_image_tile_and_stops_at_one_stride(tiny, monkeypatch):
    cfg, model = tiny
    image = np.random.default_rng(2).integers(0, 255, (60, 60, 3), dtype=np.uint8)
    budget = TileBudget(cap=MB, fixed=0, intercept=0, bytes_per_pixel=1.0, image_bytes_per_pixel=8.0, stride=16)
    # the image is predicted whole (its side is below the tile); the true cost fits no tile at all
    fake = FakeDevice(budget, true_slope=MB, monkeypatch=monkeypatch)
    predictor = CappedPredictor(budget, [Member(model)], "cpu", measure=fake.measure)
    with pytest.raises(InputError, match=r"max_memory_mb = 1: a 60x60 image"):
        predictor(image, cfg.valid)
    # each retry ran a smaller tile than the one before
    assert fake.sides[0] > 60 and all(b < a for a, b in zip(fake.sides[1:], fake.sides[2:]))
    assert len(fake.sides) <= 5


def test_on_a_cpu_the_budget_is_used_as_it_is(tiny):
    cfg, model = tiny
    image = np.random.default_rng(3).integers(0, 255, (150, 130, 3), dtype=np.uint8)
    budget = TileBudget(cap=MB, fixed=0, intercept=0, bytes_per_pixel=40.0, image_bytes_per_pixel=8.0, stride=16)
    predictor = CappedPredictor(budget, [Member(model)], "cpu")
    assert predictor.measure is None
    probs, used = predictor(image, cfg.valid)
    assert used == budget.valid_for(cfg.valid, 150, 130) and predictor.corrections == []


def test_a_try_that_ran_out_of_memory_is_retried_with_a_smaller_tile(tiny, monkeypatch):
    cfg, model = tiny
    image = np.random.default_rng(4).integers(0, 255, (200, 180, 3), dtype=np.uint8)
    budget = TileBudget(cap=2 * MB, fixed=MB, intercept=0, bytes_per_pixel=40.0, image_bytes_per_pixel=8.0,
                        stride=16)
    fake = FakeDevice(budget, true_slope=40.0, monkeypatch=monkeypatch)
    tries = []

    def out_of_memory_once(call):  # the first try fails as torch.OutOfMemoryError would, with no result
        out, peak, reserved = fake.measure(call)
        tries.append(peak)
        return (None, peak, reserved) if len(tries) == 1 else (out, peak, reserved)
    predictor = CappedPredictor(budget, [Member(model)], "cpu", measure=out_of_memory_once)
    probs, used = predictor(image, cfg.valid)
    assert len(tries) == 2 and fake.sides[1] < fake.sides[0] and used.tile_size == fake.sides[1]
    assert probs["semantic"].shape == (200, 180) and predictor.peak_allocated == tries[1] <= budget.cap


def test_the_report_names_each_correction():
    budget = TileBudget(cap=2 * MB, fixed=MB, intercept=0, bytes_per_pixel=40.0, image_bytes_per_pixel=8.0,
                        stride=16)
    predictor = CappedPredictor(budget, [], "cpu")
    assert predictor.report() == []
    predictor.corrections.append(((200, 180), 3 * MB, 128, 112))
    assert predictor.report() == ["memory cap: a 180x200 image peaked at 3 MB with tiles of 128 pixels, over the cap "
                                  "of 2 MB; it was predicted again with tiles of 112, and later images use the "
                                  "corrected fit"]
