"""The moving average of the weights ([train] ema_decay): the averaging rule and its setting."""
import pytest
import torch
from torch import nn

from model.ema import ema_decay_at, make_ema


def test_the_average_follows_the_weights_with_a_short_warm_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = make_ema(model, 0.5)
    seen = []
    for step in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(5, 3))  # training mode: the batch-norm statistics move as well
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update_parameters(model)
    # the first update copies; then decay min(0.5, (1 + n) / (10 + n)): 2/11, 3/12, ..., 0.5 from n = 8
    decays = [ema_decay_at(0.5, n) for n in range(1, 10)]
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 0.5, 0.5])
    averaged = ema.module.state_dict()
    for key, value in averaged.items():
        if key.endswith("num_batches_tracked"):  # an integer: it follows the model
            assert value.item() == seen[-1][key].item() == 10
            continue
        expect = seen[0][key]
        for d, weights in zip(decays, seen[1:]):
            expect = d * expect + (1 - d) * weights[key]
        assert torch.allclose(value, expect, atol=1e-6), key
    assert int(ema.n_averaged) == 10


def test_ema_decay_below_one(tmp_path):
    from config import ConfigError, load_config
    (tmp_path / "c.ini").write_text("[train]\nema_decay = 1\n")
    with pytest.raises(ConfigError, match="c.ini.*\\[train\\] ema_decay"):
        load_config(tmp_path / "c.ini", user_path=None)
