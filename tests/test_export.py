"""export.py: the exported TorchScript and ONNX networks give the checkpoint's own maps."""
import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

HEADS = ("semantic", "contour")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained two-head plain U-Net with [pre] stretch, its batch-norm statistics drawn at
    random so that eval mode is not the identity, saved as a checkpoint."""
    from config import load_config
    from model import build_model
    from model.checkpoint import save_checkpoint
    cfg = load_config(user_path=None)
    cfg = cfg.replace("model", model="caunet", encoder="plain", shared_decoder=True, n_filter=2)
    cfg = cfg.replace("pre", stretch=True)
    torch.manual_seed(3)
    net = build_model(cfg.model)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pkl", net, cfg, update_pointer=False)


def reference_maps(path: Path, image: np.ndarray) -> np.ndarray:
    """The checkpoint's maps through the one inference path (inference.predict_image) without TTA,
    stacked in head order: (K, H, W)."""
    from config import load_config, under_saved
    from inference import Member, predict_image
    from model.checkpoint import load_model
    model, state = load_model(path)
    cfg = under_saved(load_config(user_path=None), state["config"], str(path))[0]
    valid = dataclasses.replace(cfg.valid, test_time_augment=False, tta_rotate=False)
    maps = predict_image([Member(model.eval(), cfg.pre)], image, valid)
    return np.stack([maps[h] for h in HEADS])


def as_input(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def sample_inputs():
    """Images of the bundled sample, and crops whose padding is reflected, and replicated (a side
    smaller than its padding), as inference.pad_to_stride does."""
    from dataset.io import list_samples, read_image
    images = [read_image(s.image_path) for s in list_samples(SAMPLE)[:3]]
    return [images[0], images[0][:45, :70], images[1][:5, :40]]


def batch_inputs():
    """Two crops of two different sample images, of one size."""
    from dataset.io import list_samples, read_image
    return [read_image(s.image_path)[:96, :128] for s in list_samples(SAMPLE)[1:3]]


def test_torchscript_equals_checkpoint(checkpoint, tmp_path, monkeypatch):
    import export
    from tuning import tuned_path
    monkeypatch.chdir(tmp_path)  # no ./config.ini of the repository's user
    tuned_path(checkpoint).write_text(json.dumps({"threshold": 0.7, "policy": "rw", "mean_dsb": 0.5}))
    try:
        record = export.main([str(checkpoint), "-o", str(tmp_path / "model.pt")])
    finally:
        tuned_path(checkpoint).unlink()
    # the settings beside the file and inside it are the same record
    beside = json.loads((tmp_path / "model.pt.json").read_text())
    extra = {export.EXTRA_FILE: ""}
    net = torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    assert json.loads(extra[export.EXTRA_FILE]) == beside == json.loads(json.dumps(record))
    assert beside["heads"] == list(HEADS)
    assert beside["inside"] == {"stretch": True, "pad_mode": "reflect", "stride": 16, "sigmoid": True}
    assert beside["post"]["threshold"] == 0.7 and beside["post"]["policy"] == "rw"
    assert beside["post_origin"]["threshold"].endswith("tiny.pkl.post.json")
    assert beside["post_origin"]["threshold_edge"] == "checkpoint"
    assert beside["pre"]["stretch"] is True
    for image in sample_inputs():
        out = net(as_input([image]))
        assert out.dtype == torch.float32 and tuple(out.shape) == (1, 2, *image.shape[:2])
        np.testing.assert_allclose(out[0].numpy(), reference_maps(checkpoint, image), rtol=0, atol=1e-6)
    # a batch gives each image's own maps (the stretch is per image)
    images = batch_inputs()
    batch = net(as_input(images))
    for i, image in enumerate(images):
        np.testing.assert_allclose(batch[i].numpy(), reference_maps(checkpoint, image), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_onnx_equals_checkpoint(checkpoint, tmp_path, monkeypatch):
    """The dynamo exporter takes 15-20 s on two cores, hence slow."""
    import onnx
    import onnxruntime
    import export
    monkeypatch.chdir(tmp_path)
    export.main([str(checkpoint), "-o", str(tmp_path / "model.pt"), "--onnx", str(tmp_path / "model.onnx")])
    proto = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[export.EXTRA_FILE]) == json.loads((tmp_path / "model.onnx.json").read_text())
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for image in sample_inputs():
        out = session.run(None, {"image": as_input([image]).numpy()})[0]
        assert out.shape == (1, 2, *image.shape[:2])
        np.testing.assert_allclose(out[0], reference_maps(checkpoint, image), rtol=0, atol=1e-5)


def test_constant_padding_from_config(checkpoint, tmp_path, monkeypatch):
    """An explicit [valid] pad_mode goes into the exported network, and the maps still match."""
    import export
    from inference import Member, predict_image
    from model.checkpoint import load_model
    from config import load_config, under_saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pad.ini").write_text("[valid]\npad_mode = constant\ntest_time_augment = False\n")
    record = export.main([str(checkpoint), "-o", str(tmp_path / "m.pt"), "--config", "pad.ini"])
    assert record["inside"]["pad_mode"] == "constant"
    assert not any("test-time" in line for line in record["caller_does"])
    net = torch.jit.load(str(tmp_path / "m.pt"))
    model, state = load_model(checkpoint)
    cfg = under_saved(load_config("pad.ini", user_path=None), state["config"], "x")[0]
    image = sample_inputs()[1]
    maps = predict_image([Member(model.eval(), cfg.pre)], image, cfg.valid)
    np.testing.assert_allclose(net(as_input([image]))[0].numpy(), np.stack([maps[h] for h in HEADS]),
                               rtol=0, atol=1e-6)


def test_preparation_outside_is_recorded(tmp_path, monkeypatch):
    """A checkpoint with CLAHE: the stretch cannot run inside (CLAHE follows it), so the record says
    the caller prepares the input."""
    import export
    from config import load_config
    from model import build_model
    from model.checkpoint import save_checkpoint
    monkeypatch.chdir(tmp_path)
    cfg = load_config(user_path=None).replace("model", model="unet", encoder="plain", n_filter=2)
    cfg = cfg.replace("pre", stretch=True, clahe=True)
    path = save_checkpoint(tmp_path / "c.pkl", build_model(cfg.model), cfg, update_pointer=False)
    record = export.main([str(path), "-o", str(tmp_path / "c.pt")])
    assert record["inside"]["stretch"] is False and record["heads"] == ["semantic"]
    assert any("stretch, clahe" in line for line in record["caller_does"])


def test_refuses_to_write_over_a_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    import export
    from config import run_main
    monkeypatch.chdir(tmp_path)
    before = checkpoint.read_bytes()
    for argv in ([str(checkpoint), "-o", str(checkpoint)],
                 [str(checkpoint), "-o", str(tmp_path / "a.pt"), "--onnx", str(checkpoint)],
                 [str(checkpoint), "-o", str(tmp_path / "a.pt"), "--onnx", str(tmp_path / "a.pt")],
                 [str(checkpoint), "-o", str(tmp_path)],
                 [str(tmp_path / "missing.pkl"), "-o", str(tmp_path / "a.pt")]):
        with pytest.raises(SystemExit) as exit_info:
            run_main(export.main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert checkpoint.read_bytes() == before
    assert not (tmp_path / "a.pt").exists() and not any(tmp_path.glob(".*tmp"))
    # another training checkpoint is refused too, an earlier export is replaced
    other = tmp_path / "other.pt"
    other.write_bytes(before)
    assert zipfile.is_zipfile(other)
    with pytest.raises(SystemExit):
        run_main(export.main, [str(checkpoint), "-o", str(other)])
    assert other.read_bytes() == before
