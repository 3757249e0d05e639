"""Training on several processes with DistributedDataParallel, started by torchrun.

    torchrun --nproc_per_node=4 train.py --config my.ini            # one machine, four GPUs
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 --rdzv_id=run1 train.py ...  # two machines

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in every process it starts; `setup()` reads them
and joins the process group (nccl on CUDA, gloo on the CPU). Without them (a plain `python3
train.py`, `%run` in a notebook) it returns `SINGLE`, a one-process `World` whose collective
calls return their input without any communication, so a plain run does exactly what it did
before distributed training existed.

`[train] n_batch` stays the number of samples of one optimizer step, over all processes: each
global batch of the epoch order is shared between the processes (`RankBatches`), every process
gets the same number of batches, and each process's loss is weighted by its share of the global
batch, so the averaged gradient is the gradient of the mean loss over the global batch, as in one
process. A run therefore resumes, with the same schedule, on any number of processes.

valid.py and predict.py share images the same way (`World.share`: process r takes r, r + N, ...),
gather each image's results on rank 0 (`World.gather`, `interleave`) and stop together on an
error (`stop_together`), so their files are those of one process.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from config import InputError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank (0 .. size - 1), the number of
    processes, its rank on this machine, and the device it trains on. `size == 1` without a
    process group is the plain single-process run."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    grouped: bool = False  # a process group exists (torchrun), even of one process

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes checkpoints."""
        return self.rank == 0

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.grouped:
            return list(values)
        # float64 keeps integer counts and sums of many scores exact enough; nccl needs the device
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (every process must call it with as many values)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        """The largest of the processes' values."""
        return self._reduce([value], dist.ReduceOp.MAX)[0]

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on at least one."""
        return self.max(1.0 if flag else 0.0) > 0

    def share(self, items: Sequence) -> list:
        """This process's share of `items`: positions rank, rank + size, ... (as evaluate() shares
        the validation images); `interleave` puts the processes' results back in order."""
        return list(items[self.rank::self.size])

    def gather(self, value) -> list | None:
        """Every process's `value` (any picklable object), in rank order, on rank 0; None on the
        others. Every process must call it. One process: [value], with no copy."""
        if not self.grouped:
            return [value]
        values = [None] * self.size if self.main else None
        dist.gather_object(value, values, dst=0)
        return values

    def barrier(self) -> None:
        if self.grouped:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (batch-norm running statistics). DDP broadcasts them
        before each forward pass, but each process's last forward pass then updates its own copy
        from its own samples; validation and the checkpoint must use the same, rank 0's."""
        if self.grouped and self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as DistributedDataParallel under torchrun; the model itself otherwise."""
        if not self.grouped:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    def close(self) -> None:
        if self.grouped and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = World()


def interleave(parts: list[list]) -> list:
    """The inverse of `World.share`: the processes' results (part r holds items r, r + size, ...)
    in the order of the items."""
    merged = []
    for position in range(max((len(p) for p in parts), default=0)):
        merged += [part[position] for part in parts if position < len(part)]
    return merged


@contextlib.contextmanager
def main_prints_only(world: World) -> Iterator[None]:
    """Send the standard output of every process but rank 0 to nowhere: one set of lines, as from
    one process. (Errors on the standard error stay; see `stop_together`.)"""
    with contextlib.ExitStack() as stack:
        if not world.main:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        yield


def stop_together(world: World, error: tuple[int, str] | None) -> None:
    """After a step that every process ran: when an InputError stopped it in any process, stop all
    of them, reported once. `error` is this process's (position, message), or None; rank 0 raises
    the InputError of the lowest position (the one a single process would have met first, for
    positions in the order of the items), the other processes exit with status 2 silently. Every
    process must call it; without a process group it does nothing (raise errors directly there)."""
    if not world.grouped:
        return
    errors = world.gather(error)
    if not world.any(error is not None):
        return
    if world.main:
        raise InputError(min(e for e in errors if e is not None)[1])
    raise SystemExit(2)


def under_torchrun(environ=os.environ) -> bool:
    return all(name in environ for name in TORCHRUN_VARIABLES)


def setup(environ=os.environ) -> World:
    """The World of this process: the torchrun one (process group joined, device chosen) when
    torchrun's variables are set, else the single process on the first GPU or the CPU."""
    if not under_torchrun(environ):
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        rank, size, local_rank = (int(environ[name]) for name in TORCHRUN_VARIABLES)
    except ValueError:
        raise InputError(f"torchrun variables RANK, WORLD_SIZE, LOCAL_RANK are not integers: "
                         f"{', '.join(environ[n] for n in TORCHRUN_VARIABLES)}") from None
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank}: this machine shows only {torch.cuda.device_count()} "
                             f"GPUs; start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=size,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank=rank, size=size, local_rank=local_rank, device=device, grouped=True)


class Padded(Dataset):
    """`data` with a 'real' flag in every item; index i + len(data) is sample i as padding (flag
    False), which a process whose share of a global batch is empty trains with zero weight so
    that it still takes part in the gradient exchange."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return 2 * len(self.data)

    def __getitem__(self, index: int) -> dict:
        n = len(self.data)
        item = self.data[index % n]
        item["real"] = index < n
        return item


class RankBatches(Sampler):
    """Process `rank`'s share of each global batch of `order` (an EpochOrder, whose skip and
    set_epoch apply as in one process): the order is cut into batches of `n_batch` exactly as a
    one-process DataLoader cuts it, and process r takes positions r, r + size, ... of each. So
    every process has ceil(len(order) / n_batch) batches; where a batch has fewer samples than
    processes, the processes left without one get its first sample as padding (see Padded)."""

    def __init__(self, order, n_batch: int, rank: int, size: int, n_samples: int):
        self.order, self.n_batch, self.rank, self.size, self.n_samples = order, n_batch, rank, size, n_samples

    def __iter__(self):
        indices = list(self.order)
        for start in range(0, len(indices), self.n_batch):
            batch = indices[start:start + self.n_batch]
            yield batch[self.rank::self.size] or [batch[0] + self.n_samples]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.n_batch)


def sync_batch_norm(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The model with its batch norms synchronised over the processes ([train] sync_bn). PyTorch's
    SyncBatchNorm runs on GPUs only, so a CPU run with sync_bn is refused."""
    if world.device.type != "cuda":
        raise InputError("[train] sync_bn = True: PyTorch's SyncBatchNorm runs on GPUs only; set it to "
                         "False on the CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


SHM_HINT = ("set [train] n_worker = 0 (load in the main process, slower) or give the loader more shared "
            "memory (docker run --shm-size=8g ..., or a larger /dev/shm)")


def is_shared_memory_error(exc: BaseException) -> bool:
    """Whether `exc` is a DataLoader worker running out of shared memory (/dev/shm): PyTorch
    reports it as a bus error of the worker, or as a failed write to a torch_* segment."""
    text = str(exc)
    return ("shared memory" in text or "Bus error" in text or "bus error" in text or "/dev/shm" in text
            or ("No space left on device" in text and "torch_" in text))
