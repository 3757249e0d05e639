"""Checkpoints: written atomically, self-describing, and loadable only into the model they describe.

A checkpoint file holds {'format', 'model_config', 'config', 'state_dict', 'optimizer',
'scheduler', 'epoch', 'scores'} and, since training runs resume exactly, 'scaler' (the float16
GradScaler's state or None), 'rng' (the random generator states at the time of saving) and 'run'
(where the run stands in its learning-rate schedule, written by train.py). Checkpoints without
the last three still load for prediction. With a moving average of the weights (`[train]
ema_decay`), 'state_dict' holds the averaged weights, the ones prediction uses, 'train_state_dict'
the trained ones that training continues from, and 'ema_updates' how many steps were averaged.
`current.json` in the same folder names the latest one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from atomic import atomic_path
from config import InputError, ModelConfig

FORMAT = "nuclei-unet-1"
POINTER = "current.json"


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())  # the data is on disk before the rename makes it the checkpoint


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel (or DataParallel) wrappers, so a checkpoint
    written under torchrun has the same keys as one written by one process. A model with
    synchronised batch norms ([train] sync_bn) has the same keys as one with plain ones."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def rng_states() -> dict:
    """The states of the random generators a training run draws from outside its seeded streams."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict | None) -> None:
    """Put back what `rng_states` saved (a CUDA state only where this machine has the same GPUs)."""
    if not states:
        return
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg, optimizer=None, scheduler=None,
                    epoch: int = 0, scores: dict | None = None, update_pointer: bool = True, *,
                    scaler=None, run: dict | None = None, ema=None) -> Path:
    """Write a checkpoint to `path` (temporary name, then rename) and point current.json at it.

    `scheduler` may be a torch scheduler (its state_dict is stored) or None; `scaler` a GradScaler;
    `run` the training run's progress record (see train.py), stored as given; `ema` the moving
    average of `model`'s weights (model/ema.py) or None.
    """
    path = Path(path)
    bare = unwrap(model)
    weights = _cpu_weights(bare)
    state = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(bare.config),
        "config": cfg.as_dict(),
        "state_dict": weights if ema is None else _cpu_weights(ema.module),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "scores": dict(scores or {}),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states(),
        "run": dict(run) if run is not None else None,
    }
    if ema is not None:
        state.update(train_state_dict=weights, ema_updates=int(ema.n_averaged))
    _atomic_write(path, lambda fh: torch.save(state, fh))
    if update_pointer:
        pointer = {"latest": path.name, "epoch": int(epoch)}
        _atomic_write(path.parent / POINTER, lambda fh: fh.write(json.dumps(pointer, indent=1).encode()))
    return path


def _cpu_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint current.json names, or None when there is no current.json."""
    pointer = Path(folder) / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["latest"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{pointer}: not a valid checkpoint pointer") from None
    path = Path(folder) / name
    if not path.is_file():
        raise InputError(f"{pointer}: names {name}, which does not exist")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's contents on the CPU, checked for the expected fields."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a checkpoint of this project")
    return state


def model_config_of(state: dict, path) -> ModelConfig:
    try:
        return ModelConfig(**state["model_config"])
    except TypeError as exc:
        raise InputError(f"{path}: checkpoint model settings are not understood ({exc})") from None


def load_weights(model: nn.Module, state: dict, path, key: str = "state_dict") -> None:
    """Load the checkpoint's weights (`key`: 'state_dict', the ones for prediction, or
    'train_state_dict', see the module docstring); any missing or unexpected key is one clear error."""
    bare = unwrap(model)
    expected = set(bare.state_dict())
    found = set(state[key])
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise InputError(f"{path}: weights do not fit a {bare.config.model}/{bare.config.encoder} model "
                         f"({len(missing)} missing keys, e.g. {missing[:1]}; {len(extra)} unexpected, "
                         f"e.g. {extra[:1]})")
    try:
        bare.load_state_dict(state[key])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the model it describes "
                         f"({str(exc).splitlines()[-1].strip()})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               trained: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes, load its weights, and return (model, state).
    `trained`: the trained weights of a checkpoint that holds their moving average, instead of
    the average (an error for a checkpoint without one)."""
    from model import build_model

    state = read_checkpoint(path)
    if trained and "train_state_dict" not in state:
        raise InputError(f"{path}: holds no moving average of the weights ([train] ema_decay was 0), so no "
                         f"separate trained weights; leave out --trained-weights")
    model = build_model(dataclasses.replace(model_config_of(state, path), pretrained=False, weights_path=None))
    load_weights(model, state, path, "train_state_dict" if trained else "state_dict")
    return model.to(device), state
