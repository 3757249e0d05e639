"""Resuming a training run: an interrupted run continues exactly, a finished one starts a fresh schedule."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import train
from config import InputError
from model.checkpoint import latest_checkpoint, read_checkpoint
from tests.conftest import REPO
from tests.test_train import SETTINGS, read_scalars, workdir  # noqa: F401  (workdir is a fixture)


def settings(folder: Path, **train_keys) -> str:
    """test_train's tiny settings with a one-head model, a cosine schedule, validation every
    second epoch (and test_train's amp = off), and any other [train] keys given. The weight map
    keeps its centre term: its distance transform is exact and repeatable (dataset/targets.py)."""
    keys = {"lr_schedule": "cosine", "n_cv_epoch": 2, **train_keys}
    text = SETTINGS.format(model="unet").replace("n_cv_epoch = 1\n", "")
    text = text.replace("[train]\n", "[train]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    (folder / "settings.ini").write_text(text)
    return str(folder / "settings.ini")

# Runs train.py with its command line, but stops before the PAUSE_AT-th optimizer step: it writes
# the file PAUSED and sleeps there until the test kills it.
PAUSING = """
import os, runpy, sys, time, torch
limit, count, real = int(os.environ["PAUSE_AT"]), [0], torch.optim.Adam.step
def step(self, *args, **kwargs):
    count[0] += 1
    if count[0] == limit:
        open("PAUSED", "w").close()
        time.sleep(600)
    return real(self, *args, **kwargs)
torch.optim.Adam.step = step
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_train(folder: Path, *args: str, pause_at: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PAUSE_AT": str(pause_at or 0)}
    command = [sys.executable, "-c", PAUSING] if pause_at else [sys.executable]
    return subprocess.Popen([*command, str(REPO / "train.py"), *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


@pytest.mark.parametrize("ema_decay", [0, 0.8])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, ema_decay):
    """SIGKILL in the middle of epoch 3 of 4; train.py then continues from the epoch-2 checkpoint
    and ends with exactly the weights of a run that was never interrupted: the trained ones and,
    with [train] ema_decay, their moving average too."""
    folders = []
    for name in ("whole", "killed"):
        folder = tmp_path / name
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "train").symlink_to(REPO / "sample" / "stage1_train")
        settings(folder, ema_decay=ema_decay)
        folders.append(folder)
    whole, killed = folders
    args = ["--config", "settings.ini", "--quiet"]
    reference = run_train(whole, "--epoch", "4", *args)
    finish(reference)

    # six training images in batches of three: two optimizer steps per epoch; step 6 is epoch 3's second
    process = run_train(killed, "--epoch", "4", *args, pause_at=6)
    deadline = time.monotonic() + 600
    while not (killed / "PAUSED").exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached the step where it is killed"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed / "ckpt").name == "ckpt-2.pkl"

    out = finish(run_train(killed, *args))
    assert "Resuming the interrupted run in ckpt/ckpt-2.pkl: epoch 3 of 4" in out
    assert "Epoch: [3]" in out and "Epoch: [4]" in out and "Epoch: [5]" not in out
    whole_state, killed_state = (read_checkpoint(folder / "ckpt" / "ckpt-4.pkl") for folder in folders)
    kinds = ["state_dict", "train_state_dict"] if ema_decay else ["state_dict"]
    for kind in kinds:
        a, b = whole_state[kind], killed_state[kind]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), (kind, [k for k in a if not torch.equal(a[k], b[k])])
    assert killed_state["run"]["finished"] is True
    if ema_decay:  # eight optimizer steps averaged, and the average is not the trained weights
        assert killed_state["ema_updates"] == whole_state["ema_updates"] == 8
        a, b = killed_state["state_dict"], killed_state["train_state_dict"]
        assert not all(torch.equal(a[k], b[k]) for k in a)


def record_lrs(monkeypatch) -> list[float]:
    """The learning rate of every optimizer step taken from now on."""
    seen = []
    real = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return seen


def test_more_epochs_after_a_finished_cosine_run_start_a_fresh_schedule(workdir, monkeypatch, capsys):  # noqa: F811
    """The bug of issue 9: the rate climbed back from zero; now it starts at learn_rate and anneals."""
    config = settings(workdir)
    train.main(["--epoch", "2", "--config", config, "--quiet"])
    capsys.readouterr()
    lrs = record_lrs(monkeypatch)
    assert train.main(["--epoch", "2", "--config", config, "--quiet"]) == 4
    assert len(lrs) == 4 and lrs[0] == pytest.approx(0.001)
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:])), lrs
    assert lrs[-1] < 0.2 * 0.001
    assert "Run finished at epoch 2 in ckpt/ckpt-2.pkl; training 2 more epochs on a fresh cosine schedule " \
           "from lr 0.001" in capsys.readouterr().out
    state = read_checkpoint(latest_checkpoint("ckpt"))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed


class FakeClock:
    """time for train.py: every optimizer step takes ten seconds."""

    def __init__(self, monkeypatch):
        self.now = 1000.0
        real = torch.optim.Adam.step

        def step(optimizer, *args, **kwargs):
            self.now += 10.0
            return real(optimizer, *args, **kwargs)
        monkeypatch.setattr(torch.optim.Adam, "step", step)
        monkeypatch.setattr(train, "time", self)

    def time(self):
        return self.now

    monotonic = perf_counter = time


def record_batches(monkeypatch) -> list[list[int]]:
    """The sample indices of every training batch from now on."""
    seen = []
    real = engine.to_device

    def to_device(batch, device):
        if "labels" in batch and torch.is_grad_enabled():
            seen.append(batch["index"].tolist())
        return real(batch, device)
    monkeypatch.setattr(engine, "to_device", to_device)
    return seen


def test_an_epoch_cut_by_the_budget_is_finished_by_the_next_run(workdir, monkeypatch, capsys):  # noqa: F811
    config = settings(workdir)
    args = ["--config", config, "--quiet"]
    batches = record_batches(monkeypatch)
    train.main(["--epoch", "3", *args])
    order = list(batches)
    assert len(order) == 6 and order[:2] != order[2:4]  # a new shuffle every epoch

    with monkeypatch.context() as patch:
        FakeClock(patch)
        batches.clear()
        # 30 s of budget: the third step (the first of epoch 2) spends it
        assert train.main(["--epoch", "3", "--budget", "0.5", "--no-resume", "--overwrite", *args]) == 2
    assert batches == order[:3]
    state = read_checkpoint(latest_checkpoint(workdir / "ckpt"))
    assert state["epoch"] == 2 and state["run"]["step"] == 1 and state["run"]["finished"] is True
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0   # the budget ended the cosine schedule
    assert "stopped in epoch 2 of 3, after 1 of 2 batches" in capsys.readouterr().out

    batches.clear()
    assert train.main(["--epoch", "2", *args]) == 3
    assert ("Run finished in epoch 2 (after 1 of 2 batches) in ckpt/ckpt-2.pkl; training 2 more epochs, "
            "the rest of epoch 2 first, on a fresh cosine schedule") in capsys.readouterr().out
    assert batches == order[3:]
    assert read_checkpoint(latest_checkpoint(workdir / "ckpt"))["run"]["step"] == 0


def test_the_budget_drives_the_schedule(workdir, monkeypatch):  # noqa: F811
    """Six steps of ten seconds fill a one-minute budget long before 100 epochs: the cosine
    schedule follows the budget's spent share and ends at zero with it."""
    config = settings(workdir, warmup=0.0)
    FakeClock(monkeypatch)
    lrs = record_lrs(monkeypatch)
    assert train.main(["--epoch", "100", "--budget", "1", "--config", config, "--quiet"]) == 3
    assert lrs == pytest.approx([0.001 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    state = read_checkpoint(latest_checkpoint("ckpt"))
    assert state["run"]["finished"] is True and state["run"]["elapsed_s"] == pytest.approx(60.0)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_warm_up_then_cosine(workdir, monkeypatch):  # noqa: F811
    config = settings(workdir, warmup=0.5)
    lrs = record_lrs(monkeypatch)
    train.main(["--epoch", "2", "--config", config, "--quiet"])
    # four steps: a linear rise over the first half of the schedule, then a cosine over the second
    assert lrs == pytest.approx([0.0, 0.0005, 0.001, 0.0005])


def test_a_budgeted_run_ends_annealed(workdir):  # noqa: F811
    """On the real clock: whatever this machine's speed, a run stopped by its budget (or by its
    epochs, on a very fast one) ends with the cosine rate at zero."""
    config = settings(workdir)
    epoch = train.main(["--epoch", "1000", "--budget", "0.05", "--config", config, "--quiet"])
    state = read_checkpoint(latest_checkpoint("ckpt"))
    assert state["epoch"] == epoch and state["run"]["finished"] is True
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)
    rates = [lr for _, lr in read_scalars(workdir / "runs")["lr"]]
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))


def interrupt_at_step(monkeypatch, limit: int) -> None:
    """Ctrl-C just before the `limit`-th optimizer step."""
    count = [0]
    real = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == limit:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_epoch_and_budget_on_an_interrupted_run(workdir, monkeypatch, capsys):  # noqa: F811
    config = settings(workdir)
    args = ["--config", config, "--quiet"]
    with monkeypatch.context() as patch:
        FakeClock(patch)
        interrupt_at_step(patch, 6)   # in epoch 3 of 4, after the epoch-2 checkpoint (40 s spent)
        with pytest.raises(KeyboardInterrupt):
            train.main(["--epoch", "4", "--budget", "10", *args])
    state = read_checkpoint(latest_checkpoint("ckpt"))
    assert state["epoch"] == 2 and state["run"]["finished"] is False
    assert state["run"]["elapsed_s"] == pytest.approx(40.0) and state["run"]["budget_s"] == 600
    with pytest.raises(InputError, match="has trained 2 of its 4 epochs; give more than 2"):
        train.main(["--epoch", "2", *args])
    with pytest.raises(InputError, match=r"--budget 0.5: the interrupted run in ckpt/ckpt-2.pkl has already "
                                         r"spent 0.67 min"):
        train.main(["--budget", "0.5", *args])
    capsys.readouterr()
    assert train.main(["--epoch", "3", *args]) == 3
    out = capsys.readouterr().out
    assert "Resuming the interrupted run in ckpt/ckpt-2.pkl: epoch 3 of 3" in out
    assert "(planned length 4 -> 3 epochs)" in out
    assert read_checkpoint(latest_checkpoint("ckpt"))["run"]["finished"] is True
    # a finished run: plain train.py trains [train] n_epoch more (here 2, from the settings)
    settings(workdir, n_epoch=2)
    assert train.main(args) == 5


def test_checkpoints_without_a_run_record_still_load_and_count_as_finished(workdir, capsys):  # noqa: F811
    config = settings(workdir)
    train.main(["--epoch", "1", "--config", config, "--quiet"])
    path = workdir / "ckpt" / "ckpt-1.pkl"
    state = torch.load(path, weights_only=False)
    for key in ("run", "rng", "scaler"):   # what checkpoints held before runs resumed exactly
        del state[key]
    torch.save(state, path)
    from model.checkpoint import load_model
    load_model(path)
    capsys.readouterr()
    assert train.main(["--epoch", "1", "--config", config, "--quiet"]) == 2
    assert "without a run record counts as finished" in capsys.readouterr().out


def test_the_epoch_order_depends_only_on_seed_and_epoch():
    from torch.utils.data import WeightedRandomSampler
    order = train.EpochOrder(10, seed=3)
    order.set_epoch(5)
    fifth = list(order)
    assert sorted(fifth) == list(range(10))
    order.set_epoch(6)
    assert list(order) != fifth
    other = train.EpochOrder(10, seed=3)   # a resumed run: a new object, straight to epoch 5, 4 samples done
    other.set_epoch(5, skip=4)
    assert list(other) == fifth[4:] and len(other) == 6

    def balanced():
        generator = torch.Generator()
        weighted = WeightedRandomSampler([1.0] * 5 + [9.0] * 5, 10, replacement=True, generator=generator)
        return train.EpochOrder(10, 3, weighted, generator)
    first = balanced()
    first.set_epoch(2)
    list(first)
    first.set_epoch(5)
    draws = list(first)
    second = balanced()
    second.set_epoch(5, skip=3)
    assert list(second) == draws[3:]
