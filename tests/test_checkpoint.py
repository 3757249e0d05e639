"""Checkpoints describe their model, load only into it, and are written atomically."""
import json

import pytest
import torch

from config import InputError
from model import build_model
from model.checkpoint import latest_checkpoint, load_model, read_checkpoint, save_checkpoint


def small(cfg, **kw):
    return cfg.replace("model", encoder="plain", n_filter=4, **kw)


def test_round_trip_rebuilds_the_same_network(cfg, tmp_path):
    c = small(cfg, model="caunet", shared_decoder=True)
    model = build_model(c.model)
    path = save_checkpoint(tmp_path / "ckpt-7.pkl", model, c, epoch=7, scores={"valid_score": 0.5})
    assert latest_checkpoint(tmp_path) == path
    assert json.loads((tmp_path / "current.json").read_text()) == {"latest": "ckpt-7.pkl", "epoch": 7}
    loaded, state = load_model(path)
    assert state["epoch"] == 7 and state["config"]["model"]["model"] == "caunet"
    x = torch.rand(1, 3, 32, 32)
    a, b = model.eval().predict(x), loaded.eval().predict(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_whose_model_differs_from_its_description(cfg, tmp_path):
    c = small(cfg, model="caunet")
    path = save_checkpoint(tmp_path / "x.pkl", build_model(c.model), c)
    state = torch.load(path, weights_only=False)
    state["model_config"]["model"] = "camunet"       # says three heads, holds two
    torch.save(state, path)
    with pytest.raises(InputError, match=r"x.pkl: weights do not fit a camunet/plain model \(\d+ missing keys"):
        load_model(path)
    state["model_config"]["model"] = "caunet"
    state["model_config"]["n_filter"] = 8            # same keys, other shapes
    torch.save(state, path)
    with pytest.raises(InputError, match="x.pkl: weights do not fit the model it describes"):
        load_model(path)


def test_foreign_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pkl")
    with pytest.raises(InputError, match="other.pkl: not a checkpoint of this project"):
        read_checkpoint(tmp_path / "other.pkl")
    with pytest.raises(InputError, match="missing.pkl: checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pkl")
    (tmp_path / "current.json").write_text('{"latest": "gone.pkl"}')
    with pytest.raises(InputError, match="names gone.pkl, which does not exist"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "empty") is None


def test_best_checkpoint_does_not_move_the_pointer(cfg, tmp_path):
    c = small(cfg)
    model = build_model(c.model)
    save_checkpoint(tmp_path / "ckpt-1.pkl", model, c, epoch=1)
    save_checkpoint(tmp_path / "best.pkl", model, c, epoch=1, update_pointer=False)
    assert latest_checkpoint(tmp_path).name == "ckpt-1.pkl"
