"""Model construction, forward / backward, encoder weights and freezing, on 64x64 inputs."""
import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from config import ConfigError, load_config
from model import build_model, count_parameters
from model.blocks import ConvUnit


BASE = load_config(user_path=None)
HEADS = {"unet": ("semantic",), "caunet": ("semantic", "contour"),
         "camunet": ("semantic", "contour", "marker")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core machine more threads spin against other processes and can make these
    # small convolutions several times slower; restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(**values):
    values = {"n_filter": 8, "pretrained": False, "weights_path": None, **values}
    return BASE.replace("model", **values).model


def forward_backward(net, size=64, batch=1):
    torch.manual_seed(0)
    out = net(torch.rand(batch, 3, size, size))
    sum(o.float().mean() for o in out.values()).backward()
    return out


def check_forward_backward(model, encoder, shared):
    net = build_model(model_cfg(model=model, encoder=encoder, shared_decoder=shared))
    out = forward_backward(net)
    assert net.heads == HEADS[model]
    assert tuple(out) == HEADS[model]
    for logits in out.values():
        assert logits.shape == (1, 1, 64, 64) and logits.dtype == torch.float32
    first_encoder_weight = next(net.encoder_parameters())
    assert first_encoder_weight.grad is not None and first_encoder_weight.grad.abs().sum() > 0
    for name in HEADS[model]:
        assert net.head_convs[name].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("model", ["unet", "caunet", "camunet"])
@pytest.mark.parametrize("encoder", ["plain", "resnet34"])
def test_forward_backward(model, encoder, shared):
    check_forward_backward(model, encoder, shared)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("encoder", ["resnet18", "densenet121"])
def test_forward_backward_more_encoders(encoder, shared):
    check_forward_backward("camunet", encoder, shared)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("model", ["unet", "caunet", "camunet"])
@pytest.mark.parametrize("encoder", ["resnet18", "resnet101", "vgg16_bn", "densenet121"])
def test_forward_backward_all_encoders(model, encoder, shared):
    check_forward_backward(model, encoder, shared)


def test_vgg16_bn_camunet():
    # VGG builds a 100 M parameter classifier it then drops: one case only, outside -m slow.
    check_forward_backward("camunet", "vgg16_bn", False)


def test_predict_gives_probabilities():
    net = build_model(model_cfg(model="caunet")).eval()
    probs = net.predict(torch.rand(1, 3, 64, 64))
    assert tuple(probs) == ("semantic", "contour")
    for p in probs.values():
        assert p.dtype == torch.float32 and not p.requires_grad
        assert ((p >= 0) & (p <= 1)).all()


def test_channels_last_and_autocast():
    net = build_model(model_cfg(model="caunet", encoder="resnet18")).to(
        memory_format=torch.channels_last)
    x = torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert all(o.dtype == torch.bfloat16 and o.shape == (1, 1, 64, 64) for o in out.values())
    net.eval()
    with torch.no_grad():
        ref = net(x.contiguous())["contour"]
        assert torch.allclose(net(x)["contour"], ref, atol=1e-5)


def test_shared_and_separate_decoders_differ():
    shared = build_model(model_cfg(model="camunet", shared_decoder=True))
    separate = build_model(model_cfg(model="camunet", shared_decoder=False))
    assert list(shared.decoders) == ["shared"]
    assert list(separate.decoders) == ["semantic", "contour", "marker"]
    one_decoder = count_parameters(shared.decoders["shared"])
    assert count_parameters(separate) - count_parameters(shared) == 2 * one_decoder
    # unet has a single head, so sharing changes nothing but the decoder's key
    assert count_parameters(build_model(model_cfg(model="unet", shared_decoder=True))) == \
        count_parameters(build_model(model_cfg(model="unet", shared_decoder=False)))


def test_plain_unet_widths():
    net = build_model(model_cfg(model="unet", encoder="plain", n_filter=16))
    assert net.stride == 16
    assert net.encoder.channels == (16, 32, 64, 128, 256)
    # classic U-Net decoder: the level at stride s has n_filter * s channels
    assert [up.out_channels for up in net.decoders["semantic"].ups] == [128, 64, 32, 16]


@pytest.mark.parametrize("order", ["cab", "bca", "acb"])
def test_conv_order(order):
    net = build_model(model_cfg(model="unet", encoder="plain", conv_order=order))
    units = [m for m in net.modules() if isinstance(m, ConvUnit)]
    letter = {nn.Conv2d: "c", nn.ReLU: "a", nn.BatchNorm2d: "b"}
    assert units and all("".join(letter[type(layer)] for layer in u) == order for u in units)
    forward_backward(net)


def test_bad_input_size_names_valid_sizes():
    net = build_model(model_cfg(encoder="resnet18"))
    assert net.stride == 32
    with pytest.raises(ValueError, match=r"70x64.*stride 32.*64x64 or 96x64"):
        net(torch.rand(1, 3, 70, 64))
    plain = build_model(model_cfg(encoder="plain"))
    with pytest.raises(ValueError, match=r"16x16 or 32x32"):
        plain(torch.rand(1, 3, 20, 20))


def test_unknown_encoder():
    cfg = model_cfg()
    # Config.replace already rejects the name; dataclasses.replace skips that check
    bad = dataclasses.replace(cfg, encoder="resnet9")
    with pytest.raises(ConfigError, match=r"\[model\] encoder: unknown encoder 'resnet9' "
                                          r"\(valid: plain, resnet18"):
        build_model(bad)


def test_plain_encoder_has_no_pretrained_weights():
    with pytest.raises(ConfigError, match=r"\[model\] pretrained"):
        build_model(model_cfg(encoder="plain", pretrained=True))


def test_weights_path_loads_the_file(tmp_path):
    state = torchvision.models.resnet34().state_dict()
    state["layer3.0.conv1.weight"].fill_(0.125)
    del state["fc.weight"], state["fc.bias"]  # a file without the classifier is fine too
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    net = build_model(model_cfg(encoder="resnet34", pretrained=True, weights_path=str(path)))
    # encoder stage 4 is torchvision's layer3
    assert torch.equal(net.encoder.stages[4][0].conv1.weight,
                       torch.full_like(state["layer3.0.conv1.weight"], 0.125))


def test_weights_path_with_wrong_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # resnet18 into resnet34
    with pytest.raises(ConfigError, match=r"\[model\] weights_path: .*other\.pth"):
        build_model(model_cfg(encoder="resnet34", pretrained=True, weights_path=str(path)))
    renamed = tmp_path / "renamed.pth"
    torch.save({"backbone." + k: v for k, v in torchvision.models.resnet34().state_dict().items()},
               renamed)
    with pytest.raises(ConfigError, match=r"renamed\.pth.*unexpected keys: backbone\.conv1"):
        build_model(model_cfg(encoder="resnet34", pretrained=True, weights_path=str(renamed)))
    resized = tmp_path / "resized.pth"
    state = torchvision.models.resnet34().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(1, 64, 3, 3)
    torch.save(state, resized)
    with pytest.raises(ConfigError, match=r"resized\.pth.*wrong shape keys: layer1\.0\.conv1"):
        build_model(model_cfg(encoder="resnet34", pretrained=True, weights_path=str(resized)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state_dict")
    with pytest.raises(ConfigError, match=r"\[model\] weights_path: cannot read .*garbage\.pth"):
        build_model(model_cfg(encoder="resnet34", pretrained=True, weights_path=str(garbage)))


def test_weights_path_needs_pretrained(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\] weights_path"):
        build_model(model_cfg(encoder="resnet34", weights_path=str(tmp_path / "w.pth")))


def offline(monkeypatch, tmp_path):
    """Empty torch hub cache and a download that fails as it does without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, dst, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_offline_names_the_file(monkeypatch, tmp_path):
    cache = offline(monkeypatch, tmp_path)
    url = torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url
    with pytest.raises(ConfigError) as err:
        build_model(model_cfg(encoder="resnet34", pretrained=True))
    message = str(err.value)
    assert "\n" not in message and url in message and str(cache) in message
    assert message.startswith("[model] pretrained")


def test_pretrained_uses_the_cached_file(monkeypatch, tmp_path):
    cache = offline(monkeypatch, tmp_path)
    cache.mkdir(parents=True)
    state = torchvision.models.densenet121().state_dict()
    # the published DenseNet files use the old key names, e.g. 'norm.1' for 'norm1'
    state = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
             for k, v in state.items()}
    state["features.denseblock2.denselayer3.conv.2.weight"].fill_(-0.5)
    # nor do they have the batch norms' num_batches_tracked counters
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    torch.save(state, cache / url.rsplit("/", 1)[1])
    net = build_model(model_cfg(encoder="densenet121", pretrained=True))
    layer = net.encoder.stages[3][1].denselayer3  # stage 3 = transition1 + denseblock2
    assert (layer.conv2.weight == -0.5).all()


def test_freeze_encoder():
    net = build_model(model_cfg(model="caunet", encoder="resnet18")).train()
    net.freeze_encoder(True)
    assert count_parameters(net, trainable_only=True) == \
        count_parameters(net) - count_parameters(net.encoder)
    bn = net.encoder.stages[1][1]
    running_mean = bn.running_mean.clone()
    net.train()  # the optimiser loop calls train() every epoch: a frozen encoder stays in eval
    assert not bn.training and net.decoders["semantic"].training
    forward_backward(net)
    assert all(p.grad is None for p in net.encoder_parameters())
    assert torch.equal(bn.running_mean, running_mean)
    assert net.head_convs["contour"].weight.grad is not None
    net.freeze_encoder(False)
    assert bn.training
    forward_backward(net)
    assert all(p.grad is not None for p in net.encoder_parameters())
