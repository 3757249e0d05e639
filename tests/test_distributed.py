"""Training under torchrun (DistributedDataParallel) on the CPU with the gloo backend, two processes
on the bundled sample, against one process; the validation limits; loader shared-memory errors."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from config import InputError
from distributed import Padded, RankBatches, is_shared_memory_error
from model.checkpoint import load_model, read_checkpoint
from tests.conftest import REPO, SAMPLE
from tests.test_train import SETTINGS, read_scalars, settings, workdir  # noqa: F401  (workdir is a fixture)

# One head, constant rate. Two processes with n_batch = 2 give each process one sample per step;
# one process with n_batch = 1 and grad_accum = 2 sees the same two samples per optimizer step,
# each in its own forward pass, so its batch norms see the same single-sample statistics.
DDP_SETTINGS = SETTINGS.format(model="unet").replace("n_batch = 3\n", "n_batch = 2\n")
ONE_PROCESS_SETTINGS = SETTINGS.format(model="unet").replace("n_batch = 3\n", "n_batch = 1\ngrad_accum = 2\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_with_sample(path: Path, settings_text: str) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "data" / "train").symlink_to(SAMPLE)
    (path / "settings.ini").write_text(settings_text)
    return path


def run(folder: Path, *args: str, processes: int = 0, script: Path = REPO / "train.py") -> subprocess.CompletedProcess:
    """train.py in `folder`, alone (processes = 0) or under torchrun with that many processes;
    one thread per process in both cases, so both compute in the same order."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                     f"--master_port={free_port()}"]
    return subprocess.run([*launcher, str(script), "--config", "settings.ini", "--quiet", *args], cwd=folder,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def parameters(path: Path, kind: str = "state_dict") -> dict[str, torch.Tensor]:
    """The checkpoint's parameters (`kind`: the weights prediction uses, or 'train_state_dict');
    batch-norm running statistics are buffers and left out: under DDP they are rank 0's, updated
    from its own samples only (see the test below)."""
    return {k: v for k, v in read_checkpoint(path)[kind].items()
            if "running_" not in k and "num_batches_tracked" not in k}


@pytest.mark.parametrize("ema", ["", "ema_decay = 0.5\n"])
def test_two_processes_train_the_weights_of_one(tmp_path, ema):
    """Two epochs (six steps) with two gloo processes against one process that sees the same two
    samples per optimizer step. Each optimizer step then gets the mean of the same two per-sample
    gradients: DDP halves each process's gradient and sums them, one process adds two halves.
    Halving is exact in floating point and a sum of two terms has one order, so the parameters
    agree to the last bit on one machine; the tolerance of 1e-6 only leaves room for another gloo
    build, and is far below the 1e-3 the parameters move in the second epoch. With [train]
    ema_decay the same holds for the moving average, which validation and the checkpoint use."""
    ddp = folder_with_sample(tmp_path / "ddp", DDP_SETTINGS.replace("[train]\n", "[train]\n" + ema))
    one = folder_with_sample(tmp_path / "one", ONE_PROCESS_SETTINGS.replace("[train]\n", "[train]\n" + ema))
    result = run(ddp, "--epoch", "2", processes=2)
    assert result.returncode == 0, result.stdout
    reference = run(one, "--epoch", "2")
    assert reference.returncode == 0, reference.stdout

    # one set of output: the checkpoints and event files of one process, each epoch line printed once
    assert sorted(p.name for p in (ddp / "ckpt").iterdir()) == sorted(p.name for p in (one / "ckpt").iterdir())
    assert not list((ddp / "ckpt").glob("*.tmp"))
    assert len(list((ddp / "runs").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in read_scalars(ddp / "runs")["train/loss"]] == [1, 2]
    assert result.stdout.count("Epoch: [2]") == 1 and result.stdout.count("Starting a new training run") == 1
    assert "x 2 processes (DistributedDataParallel" in result.stdout

    trained, expected = parameters(ddp / "ckpt" / "ckpt-2.pkl"), parameters(one / "ckpt" / "ckpt-2.pkl")
    assert trained.keys() == expected.keys()
    assert max((trained[k] - expected[k]).abs().max().item() for k in trained) <= 1e-6
    before = parameters(ddp / "ckpt" / "ckpt-1.pkl")
    assert max((trained[k] - before[k]).abs().max().item() for k in trained) > 1e-3
    if ema:  # the checkpoint's weights are the average; the trained ones agree as well
        raw = [parameters(folder / "ckpt" / "ckpt-2.pkl", "train_state_dict") for folder in (ddp, one)]
        assert max((raw[0][k] - raw[1][k]).abs().max().item() for k in raw[0]) <= 1e-6
        assert max((raw[0][k] - trained[k]).abs().max().item() for k in trained) > 1e-4
    # the training loss is the mean over both processes' samples, as in one process
    assert read_checkpoint(ddp / "ckpt" / "ckpt-2.pkl")["scores"]["train_loss"] == pytest.approx(
        read_checkpoint(one / "ckpt" / "ckpt-2.pkl")["scores"]["train_loss"], abs=1e-6)

    # the checkpoint loads in one process, and its validation scores (each process scored one of
    # the two validation images, the sums were added) are those of one process over both images
    from config import load_config
    from engine import evaluate
    from dataset import NucleiDataset, training_split
    model, state = load_model(ddp / "ckpt" / "ckpt-2.pkl")
    old = os.getcwd()
    os.chdir(ddp)
    try:
        cfg = load_config("settings.ini", user_path=None)
        _, valid_samples = training_split(cfg)
        loader = torch.utils.data.DataLoader(NucleiDataset(valid_samples, cfg, augment=False))
        stats, _ = evaluate(model, loader, cfg, torch.device("cpu"))
    finally:
        os.chdir(old)
    assert len(valid_samples) == 2
    assert stats["loss"] == pytest.approx(state["scores"]["valid_loss"], rel=1e-6)
    assert stats["dsb"] == pytest.approx(state["scores"]["valid_score"], abs=1e-9)


@pytest.mark.slow
def test_a_one_process_checkpoint_goes_on_under_torchrun(tmp_path):
    """One epoch in one process, then one more under torchrun: the weights of two epochs in one process."""
    one = folder_with_sample(tmp_path / "one", ONE_PROCESS_SETTINGS)
    assert run(one, "--epoch", "2").returncode == 0
    split = folder_with_sample(tmp_path / "split", ONE_PROCESS_SETTINGS)
    assert run(split, "--epoch", "1").returncode == 0
    (split / "settings.ini").write_text(DDP_SETTINGS)
    result = run(split, "--epoch", "1", processes=2)
    assert result.returncode == 0, result.stdout
    assert "Run finished at epoch 1" in result.stdout
    trained, expected = parameters(split / "ckpt" / "ckpt-2.pkl"), parameters(one / "ckpt" / "ckpt-2.pkl")
    assert max((trained[k] - expected[k]).abs().max().item() for k in trained) <= 1e-6


# Runs train.py after making the loss NaN in process 1 only, from its second batch on.
NAN_IN_RANK_ONE = """
import os, runpy, sys
import engine
real, count = engine.multitask_loss, [0]
def loss(outputs, batch, cfg):
    total, per_head = real(outputs, batch, cfg)
    count[0] += 1
    if os.environ["RANK"] == "1" and count[0] >= 2:
        total = total * float("nan")
    return total, per_head
engine.multitask_loss = loss
sys.argv = [sys.argv[0].replace("nan_rank1.py", "train.py"), *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "train.py"), run_name="__main__")
"""


@pytest.mark.slow
def test_the_processes_agree_on_the_budget_and_on_a_nan_loss(tmp_path):
    """A budget spent in one process stops all of them at the same batch, with one checkpoint;
    a NaN loss in process 1 alone stops both (rather than leaving process 0 waiting in the
    gradient exchange), and the last checkpoint stays."""
    folder = folder_with_sample(tmp_path / "ddp", DDP_SETTINGS)
    result = run(folder, "--epoch", "50", "--budget", "0.0001", processes=2)
    assert result.returncode == 0, result.stdout
    assert "Wall-clock budget" in result.stdout and (folder / "ckpt" / "ckpt-1.pkl").is_file()
    script = tmp_path / "nan_rank1.py"
    script.write_text(NAN_IN_RANK_ONE)
    result = run(folder, "--epoch", "2", processes=2, script=script)
    assert result.returncode != 0
    assert "the loss is not finite in 1 of 2 processes" in result.stdout
    assert "the loss is nan" in result.stdout
    assert read_checkpoint(folder / "ckpt" / "ckpt-1.pkl")["epoch"] == 1
    assert not (folder / "ckpt" / "ckpt-2.pkl").exists()


def test_rank_batches_share_each_global_batch():
    """Each process takes every size-th sample of each global batch, one process's DataLoader cut;
    a process left without a sample of a short last batch gets padding (index + n)."""
    order = train.EpochOrder(7, seed=1)
    order.set_epoch(3)
    whole = list(order)
    shares = [list(RankBatches(order, 3, rank, 2, 7)) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 3] == [len(RankBatches(order, 3, r, 2, 7)) for r in range(2)]
    assert shares[0][:2] == [[whole[0], whole[2]], [whole[3], whole[5]]]
    assert shares[1][:2] == [[whole[1]], [whole[4]]]
    assert shares[0][2] == [whole[6]] and shares[1][2] == [whole[6] + 7]
    order.set_epoch(3, skip=3)  # a resumed epoch: the same batches from the second on
    assert list(RankBatches(order, 3, 1, 2, 7)) == shares[1][1:]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"index": i}
    assert Padded(Items())[9] == {"index": 2, "real": False} and Padded(Items())[2]["real"]


def test_sync_bn_on_the_cpu_is_refused():
    from distributed import World, sync_batch_norm
    with pytest.raises(InputError, match=r"\[train\] sync_bn = True: .* GPUs only"):
        sync_batch_norm(torch.nn.BatchNorm2d(3), World(size=2, grouped=True))


SHM_MESSAGES = [
    "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are "
    "out of shared memory. Please try to raise your shared memory limit.",
    "unable to write to file </torch_4242_1234567_0>: No space left on device (28)",
]


@pytest.mark.parametrize("message", SHM_MESSAGES)
def test_loader_out_of_shared_memory_is_one_line(workdir, monkeypatch, message):
    """The errors PyTorch raises when loader workers run out of /dev/shm (simulated here by a
    dataset that raises them) become one line naming the settings to change; nothing is written."""
    from dataset import NucleiDataset

    def out_of_shm(self, index):
        raise RuntimeError(message)
    monkeypatch.setattr(NucleiDataset, "__getitem__", out_of_shm)
    with pytest.raises(InputError, match=r"out of shared memory: set \[train\] n_worker = 0 .*--shm-size") as info:
        train.main(["--epoch", "1", "--config", settings(workdir), "--quiet"])
    assert "\n" not in str(info.value)
    assert not (workdir / "ckpt").exists() or not list((workdir / "ckpt").glob("*.pkl"))


def test_other_loader_errors_are_left_alone():
    assert not is_shared_memory_error(RuntimeError("CUDA out of memory"))
    assert not is_shared_memory_error(OSError(28, "No space left on device", "checkpoint/ckpt-3.pkl"))
    assert is_shared_memory_error(OSError(28, "No space left on device", "/dev/shm/torch_12_34"))


def test_validation_limits(cfg, tmp_path, capsys):
    """[train] valid_max_images scores the first images only; valid_max_minutes stops the pass
    when the time is up, after at least one image; both say so."""
    from dataset import NucleiDataset, training_split
    from engine import evaluate
    from model import build_model
    from tests.test_checkpoint import small
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(SAMPLE)
    cfg = small(cfg, model="unet").replace("dataset", root=str(tmp_path / "data"), cv_ratio=0.0)
    cfg = cfg.replace("valid", test_time_augment=False)
    # the two smallest images, and a third for the count (never predicted)
    samples = sorted(training_split(cfg)[0], key=lambda s: s.image_path.stat().st_size)[:3]
    torch.manual_seed(0)
    model = build_model(cfg.model)

    def scores(c, chosen):
        loader = torch.utils.data.DataLoader(NucleiDataset(chosen, c, augment=False))
        return evaluate(model, loader, c, torch.device("cpu"))[0]
    first, both = scores(cfg, samples[:1]), scores(cfg, samples[:2])
    assert "Validation scored" not in capsys.readouterr().out and both != first
    assert scores(cfg.replace("train", valid_max_images=1), samples) == first
    assert "Validation scored 1 of 3 images ([train] valid_max_images = 1)" in capsys.readouterr().out
    assert scores(cfg.replace("train", valid_max_minutes=1e-9), samples) == first
    assert "Validation scored 1 of 3 images ([train] valid_max_minutes = 1e-09 reached)" in capsys.readouterr().out
    assert scores(cfg.replace("train", valid_max_images=2), samples) == both
