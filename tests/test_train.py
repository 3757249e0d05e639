"""train.py end to end on the bundled sample, in a temporary folder."""
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train
from config import InputError
from model import build_model
from model.checkpoint import latest_checkpoint, load_model, read_checkpoint
from tests.conftest import REPO, SAMPLE, run_in_kernel

# amp = off: float32 on every CPU, so results do not depend on the machine; under bfloat16
# autocast this four-channel network trains about ten times more slowly than in float32 even on a
# CPU with AMX (docs/training.md)
SETTINGS = """
[model]
model = {model}
encoder = plain
n_filter = 4
[train]
amp = off
n_batch = 3
n_worker = 0
n_cv_epoch = 1
n_ckpt_epoch = 1
learn_rate = 0.001
checkpoint_dir = ckpt
log_dir = runs
[pre]
width = 64
[dataset]
root = data
cv_ratio = 0.25
cache_dir = cache
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(SAMPLE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def settings(workdir, model="camunet", extra=""):
    path = workdir / "settings.ini"
    path.write_text(SETTINGS.format(model=model) + textwrap.dedent(extra))
    return str(path)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file in `folder`, parsed from the TFRecord framing."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_two_epochs_then_resume(workdir, capsys):
    config = settings(workdir)
    assert train.main(["--epoch", "2", "--config", config, "--quiet"]) == 2
    ckpt = workdir / "ckpt"
    assert {p.name for p in ckpt.iterdir()} >= {"ckpt-1.pkl", "ckpt-2.pkl", "best.pkl", "current.json"}
    assert json.loads((ckpt / "current.json").read_text())["latest"] == "ckpt-2.pkl"
    state = read_checkpoint(ckpt / "ckpt-2.pkl")
    assert state["epoch"] == 2 and state["config"]["train"]["n_batch"] == 3
    assert state["model_config"]["model"] == "camunet"
    scalars = read_scalars(workdir / "runs")
    for tag in ("train/loss", "train/iou_semantic", "train/loss_marker", "valid/loss", "valid/iou_contour", "lr"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    out = capsys.readouterr().out
    assert "Epoch: [2]" in out and "IoU(marker)" in out

    assert train.main(["--epoch", "1", "--config", config, "--quiet", "--lr", "0.0005"]) == 3
    state = read_checkpoint(latest_checkpoint(ckpt))
    assert state["epoch"] == 3
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    assert "Run finished at epoch 2" in capsys.readouterr().out


def test_checkpoint_rebuilds_its_own_model(workdir):
    train.main(["--epoch", "1", "--config", settings(workdir, model="caunet"), "--quiet"])
    model, state = load_model(workdir / "ckpt" / "ckpt-1.pkl")
    assert model.heads == ("semantic", "contour")
    probs = model.eval().predict(torch.rand(1, 3, 64, 64))
    assert set(probs) == {"semantic", "contour"}


def test_resume_with_another_model_is_a_clear_error(workdir):
    train.main(["--epoch", "1", "--config", settings(workdir, model="unet"), "--quiet"])
    with pytest.raises(InputError, match=r"trained with \[model\] model = unet, but the settings say camunet"):
        train.main(["--epoch", "1", "--config", settings(workdir, model="camunet"), "--quiet"])
    assert train.main(["--epoch", "1", "--config", settings(workdir), "--quiet", "--no-resume", "--overwrite"]) == 1


def test_a_new_run_does_not_silently_replace_an_earlier_one(workdir):
    """--no-resume in a folder with checkpoints once wrote the new run's ckpt-1.pkl and best.pkl
    over the old run's; now it is refused unless --overwrite deletes the old run first."""
    config = settings(workdir)
    train.main(["--epoch", "2", "--config", config, "--quiet"])
    ckpt = workdir / "ckpt"
    (ckpt / "best.pkl.post.json").write_text("{}")  # tuned for the old best.pkl only
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(InputError, match="ckpt: holds the checkpoints of an earlier run .* add --overwrite"):
        train.main(["--epoch", "1", "--config", config, "--quiet", "--no-resume"])
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert train.main(["--epoch", "1", "--config", config, "--quiet", "--no-resume", "--overwrite"]) == 1
    assert not (ckpt / "ckpt-2.pkl").exists() and not (ckpt / "best.pkl.post.json").exists()
    assert read_checkpoint(ckpt / "ckpt-1.pkl")["epoch"] == 1


def test_interrupted_save_keeps_the_previous_checkpoint(workdir, monkeypatch):
    config = settings(workdir)
    train.main(["--epoch", "1", "--config", config, "--quiet"])
    real_save = torch.save

    def broken_save(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--epoch", "1", "--config", config, "--quiet"])
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = workdir / "ckpt"
    assert latest_checkpoint(ckpt).name == "ckpt-1.pkl"
    assert not list(ckpt.glob("*.tmp")) and not (ckpt / "ckpt-2.pkl").exists()
    load_model(ckpt / "ckpt-1.pkl")


def test_nan_loss_stops_and_keeps_last_checkpoint(workdir, monkeypatch):
    config = settings(workdir)
    train.main(["--epoch", "1", "--config", config, "--quiet"])
    import engine
    real = engine.multitask_loss
    monkeypatch.setattr(engine, "multitask_loss",
                        lambda out, batch, cfg: (real(out, batch, cfg)[0] * float("nan"), real(out, batch, cfg)[1]))
    with pytest.raises(engine.NonFiniteLoss, match="loss is nan"):
        train.main(["--epoch", "1", "--config", config, "--quiet"])
    assert latest_checkpoint(workdir / "ckpt").name == "ckpt-1.pkl"


def test_budget_stops_with_a_checkpoint(workdir, capsys):
    config = settings(workdir)
    assert train.main(["--epoch", "50", "--config", config, "--quiet", "--budget", "0.0001"]) == 1
    assert latest_checkpoint(workdir / "ckpt").name == "ckpt-1.pkl"
    assert "budget" in capsys.readouterr().out


def test_damaged_checkpoint_is_one_line(workdir):
    (workdir / "ckpt").mkdir()
    (workdir / "ckpt" / "ckpt-5.pkl").write_bytes(b"junk")
    (workdir / "ckpt" / "current.json").write_text('{"latest": "ckpt-5.pkl"}')
    with pytest.raises(InputError, match="ckpt-5.pkl: not a readable checkpoint"):
        train.main(["--epoch", "1", "--config", settings(workdir), "--quiet"])


def test_run_inside_a_jupyter_kernel(workdir):
    """`%run train.py --epoch 1` trains in a real IPython kernel, which stays alive afterwards."""
    replies = run_in_kernel(workdir, [f"%run {REPO / 'train.py'} --epoch 1 --config {settings(workdir)} --quiet",
                                      "assert callable(main)"])
    assert [r["status"] for r in replies] == ["ok", "ok"], [(r.get("ename"), r.get("evalue")) for r in replies]
    assert (workdir / "ckpt" / "ckpt-1.pkl").is_file()


def test_bfloat16_training_keeps_float32_weights(workdir, monkeypatch):
    """[train] amp = bfloat16 runs the convolutions in bfloat16 on a CPU; the losses, the weights
    and the checkpoint stay float32."""
    seen = set()

    def build_and_watch(model_cfg):
        model = build_model(model_cfg)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
        return model
    monkeypatch.setattr(train, "build_model", build_and_watch)
    config = settings(workdir)
    Path(config).write_text(Path(config).read_text().replace("amp = off\n", "amp = bfloat16\n"))
    train.main(["--epoch", "2", "--config", config, "--quiet"])
    state = read_checkpoint(latest_checkpoint(Path("ckpt")))
    assert all(v.dtype == torch.float32 for v in state["state_dict"].values() if v.is_floating_point())
    losses = [v for _, v in read_scalars(Path("runs"))["train/loss"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.bfloat16 in seen


def cpu_with(monkeypatch, **units):
    """Make PyTorch's CPU capability query report these bfloat16 units (the others absent)."""
    caps = {"architecture": "x86_64", "avx2": True, "amx_bf16": False, "avx512_bf16": False, **units}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


def cuda_card(monkeypatch, capability, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


def test_amp_auto_picks_the_precision_from_the_hardware(monkeypatch):
    from engine import choose_precision
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cpu_with(monkeypatch, amx_bf16=True, avx512_bf16=True)
    assert choose_precision("auto", cpu) == (torch.bfloat16, "amp = auto: this CPU has amx_bf16 and avx512_bf16")
    cpu_with(monkeypatch, avx512_bf16=True)
    assert choose_precision("auto", cpu)[0] == torch.bfloat16
    cpu_with(monkeypatch)
    dtype, why = choose_precision("auto", cpu)
    assert dtype is None and "neither amx_bf16 nor avx512_bf16" in why
    assert choose_precision("bfloat16", cpu) == (torch.bfloat16, "[train] amp = bfloat16")
    assert choose_precision("off", cpu)[0] is None

    cuda_card(monkeypatch, (8, 0), True)
    assert choose_precision("auto", cuda)[0] == torch.bfloat16
    cuda_card(monkeypatch, (9, 0), False)      # no native bfloat16 reported
    assert choose_precision("auto", cuda)[0] == torch.float16
    cuda_card(monkeypatch, (7, 5), True)       # bfloat16 only emulated on older cards
    dtype, why = choose_precision("auto", cuda)
    assert dtype == torch.float16 and "7.5" in why and "loss scaling" in why
    assert choose_precision("off", cuda)[0] is None


def test_amp_auto_reads_cpuinfo_where_pytorch_cannot_say(monkeypatch, tmp_path):
    import engine

    def no_query():
        raise RuntimeError("cpuinfo failed to initialize")
    monkeypatch.setattr(torch.cpu, "get_capabilities", no_query)
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(engine, "CPUINFO", str(info))
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert engine.cpu_bf16_units() == {"amx_bf16": False, "avx512_bf16": True}
    assert engine.choose_precision("auto", torch.device("cpu"))[0] == torch.bfloat16
    assert engine.cpu_model() == "Some CPU"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert engine.choose_precision("auto", torch.device("cpu"))[0] is None
    info.unlink()
    assert engine.choose_precision("auto", torch.device("cpu"))[0] is None


def test_the_chosen_precision_is_printed_with_its_reason(workdir, monkeypatch, capsys):
    cpu_with(monkeypatch)
    config = settings(workdir, model="unet")
    Path(config).write_text(Path(config).read_text().replace("amp = off\n", "amp = auto\n"))
    train.main(["--epoch", "1", "--config", config, "--quiet"])
    assert "Precision: float32 (amp = auto: this CPU has neither amx_bf16 nor avx512_bf16" in capsys.readouterr().out


def test_ctrl_c_is_raised_at_the_loops_own_check_points():
    import os
    import signal
    from train import SafeInterrupt
    before = signal.getsignal(signal.SIGINT)
    interrupt = SafeInterrupt().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled at once in the main thread: only a flag is set
        assert interrupt.pending
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for a check point
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        interrupt.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_valid_predicts_with_the_moving_average_unless_told(workdir):
    """[train] ema_decay: the checkpoint's prediction weights are the average; valid.py
    --trained-weights takes the trained ones, and on a checkpoint without an average it is a
    one-line error naming the file."""
    import valid
    from config import load_config
    config = Path(settings(workdir, model="unet"))
    config.write_text(config.read_text().replace("[train]\n", "[train]\nema_decay = 0.5\n"))
    train.main(["--epoch", "2", "--config", str(config), "--quiet"])
    path = workdir / "ckpt" / "ckpt-2.pkl"
    state = read_checkpoint(path)
    cfg = load_config(config, user_path=None)
    for trained, key in ((False, "state_dict"), (True, "train_state_dict")):
        members, _ = valid.load_members([path], cfg, torch.device("cpu"), False, trained)
        got = members[0].model.state_dict()
        assert all(torch.equal(got[k], state[key][k]) for k in got), key
    assert not all(torch.equal(state["state_dict"][k], state["train_state_dict"][k]) for k in got)

    config.write_text(config.read_text().replace("ema_decay = 0.5", "ema_decay = 0"))
    train.main(["--epoch", "1", "--no-resume", "--overwrite", "--config", str(config), "--quiet"])
    result = subprocess.run([sys.executable, str(REPO / "valid.py"), "ckpt/ckpt-1.pkl", "--trained-weights",
                             "--dataset", "valid", "--config", str(config)], cwd=workdir, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: ckpt/ckpt-1.pkl: holds no moving average of the weights ([train] "
                                     "ema_decay was 0), so no separate trained weights; leave out --trained-weights")
