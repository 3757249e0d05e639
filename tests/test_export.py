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


def package_members(pkg: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(pkg) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def load_npy(data: bytes) -> np.ndarray:
    import io
    return np.load(io.BytesIO(data))


def test_bioimageio_package(checkpoint, tmp_path, monkeypatch):
    """--bioimageio PATH.zip: bioimageio.spec loads the package, with its files, as a valid model
    description; its test tensors are the first sample image and the checkpoint's maps of it, and
    bioimageio.core's test_model reruns the packaged TorchScript on them (about 8 s)."""
    import hashlib
    import io
    import export
    from bioimageio.spec import load_description
    from dataset.io import list_samples, read_image
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    pkg = tmp_path / "pkg.zip"
    record = export.main([str(checkpoint), "--bioimageio", str(pkg)])
    assert not (tmp_path / "model.pt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pkg.zip"]
    descr = load_description(pkg, perform_io_checks=True)
    summary = descr.validation_summary
    assert summary.status == "valid-format" and not summary.errors, summary.format()
    assert descr.type == "model" and descr.format_version.startswith("0.5.")
    # the only warning: no licence (the repository states none)
    assert [w.loc for w in summary.warnings] == [("license",)] and descr.license is None
    assert [a.name for a in descr.authors] == [export.PROJECT_AUTHOR]
    assert {str(c.doi) for c in descr.cite} == {export.CITE_UNET[1], export.CITE_DCAN[1], export.CITE_DSB[1]}
    (image_in,), (maps_out,) = descr.inputs, descr.outputs
    assert [str(a.id) for a in image_in.axes] == ["batch", "channel", "y", "x"] == [str(a.id) for a in maps_out.axes]
    assert image_in.axes[1].channel_names == ["red", "green", "blue"]
    assert maps_out.axes[1].channel_names == list(HEADS)
    assert image_in.data.type == "uint8" and maps_out.data.type == "float32"
    assert [p.id for p in image_in.preprocessing] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
    assert image_in.preprocessing[1].kwargs.gain == pytest.approx(1 / 255)
    assert maps_out.axes[2].halo == 32 and image_in.axes[2].size.min == 80  # [valid] tile_overlap 64, stride 16
    assert descr.weights.torchscript is not None and descr.weights.onnx is None

    files = package_members(pkg)
    assert {"rdf.yaml", "README.md", "cover.png", export.EXTRA_FILE, "test_input.npy", "test_output.npy",
            "weights_torchscript.pt"} <= set(files)
    image = read_image(list_samples(SAMPLE)[0].image_path)[:256, :256]
    test_input, test_output = load_npy(files["test_input.npy"]), load_npy(files["test_output.npy"])
    assert test_input.dtype == np.uint8 and np.array_equal(test_input, image.transpose(2, 0, 1)[None])
    assert test_output.dtype == np.float32 and test_output.shape == (1, 2, 256, 256)
    np.testing.assert_allclose(test_output[0], reference_maps(checkpoint, image), rtol=0, atol=1e-6)
    net = torch.jit.load(io.BytesIO(files["weights_torchscript.pt"]))
    scaled = torch.from_numpy(test_input).float() * np.float32(1 / 255)  # the package's preprocessing
    np.testing.assert_allclose(net(scaled).numpy(), test_output, rtol=0, atol=1e-6)
    # the settings attachment is the export record, with the package's sizes and name
    settings = json.loads(files[export.EXTRA_FILE])
    assert settings["heads"] == list(HEADS) and settings["post"] == json.loads(json.dumps(record["post"]))
    assert settings["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert settings["bioimageio"] == {"min_size": 80, "halo": 32, "name": str(descr.name)}
    readme = files["README.md"].decode()
    assert "## Validation" in readme and "`contour`" in readme and "no licence" in readme
    assert Image.open(io.BytesIO(files["cover.png"])).size == (512, 256)
    # the field's own check: preprocessing, weights and comparison as a consumer runs them
    from bioimageio.core import test_model
    tested = test_model(pkg)
    assert tested.status == "passed", tested.format()
    assert [d.status for d in tested.details if d.name.startswith("Reproduce test outputs")] == ["passed"]


@pytest.mark.slow
def test_bioimageio_core_reproduces_the_test_outputs(checkpoint, tmp_path, monkeypatch):
    """A folder package with ONNX weights too: bioimageio.core's test_model reruns both weight
    formats on the test input; a second export replaces the first folder. Slow: the ONNX export
    and the test runs take 20 to 30 s on two cores."""
    import export
    from bioimageio.core import test_model
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "package"
    export.main([str(checkpoint), "--bioimageio", str(folder), "--author", "A Person", "--license", "MIT"])
    (folder / "stray.txt").write_text("left by an earlier package")
    export.main([str(checkpoint), "--bioimageio", str(folder), "--onnx", str(tmp_path / "m.onnx"),
                 "--author", "A Person", "--license", "MIT"])
    assert not (folder / "stray.txt").exists() and (folder / "weights.onnx").is_file()
    summary = test_model(folder / "rdf.yaml")
    assert summary.status == "passed", summary.format()
    reproduced = [d.name for d in summary.details if d.name.startswith("Reproduce test outputs")]
    assert len(reproduced) == 2 and all(d.status == "passed" for d in summary.details)
    assert any("onnx" in n for n in reproduced) and any("torchscript" in n for n in reproduced)
    assert not summary.warnings or all(w.loc != ("license",) for w in summary.warnings)


def test_bioimageio_refusals(checkpoint, tmp_path, monkeypatch, capsys):
    """Package outputs that would overwrite other files, a checkpoint whose input is prepared
    outside the network (CLAHE), a test image smaller than the package's smallest input and a bad
    licence are refused with one line, exit status 2, before anything is written."""
    import export
    from config import load_config, run_main
    from model import build_model
    from model.checkpoint import save_checkpoint
    from conftest import write_png
    monkeypatch.chdir(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "folder.zip").mkdir()
    cfg = load_config(user_path=None).replace("model", model="unet", encoder="plain", n_filter=2)
    clahe = save_checkpoint(tmp_path / "clahe.pkl", build_model(cfg.replace("pre", clahe=True).model),
                            cfg.replace("pre", clahe=True), update_pointer=False)
    small = write_png(tmp_path / "small.png", np.full((40, 60, 3), 90, np.uint8))
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [([str(checkpoint), "--bioimageio", str(busy)], "not an earlier package"),
             ([str(checkpoint), "--bioimageio", str(checkpoint.parent)], "holds the checkpoint"),
             ([str(checkpoint), "--bioimageio", str(tmp_path / "folder.zip")], "names a folder"),
             ([str(clahe), "-o", "c.pt", "--bioimageio", "c.zip"], "cannot describe [pre] clahe"),
             ([str(checkpoint), "-o", "s.pt", "--bioimageio", "s.zip", "--test-image", str(small)],
              "smaller than the package's smallest input side 80"),
             ([str(checkpoint), "--bioimageio", "l.zip", "--license", "Not-A-Licence"], "SPDX"),
             ([str(checkpoint)], "nothing to write")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(export.main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
