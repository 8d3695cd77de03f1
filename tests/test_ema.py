"""The actor's weight average (`actor_ema`): the average's arithmetic, swapping it in and out, and an
RL stage that hands on the average and resumes it exactly."""

import pytest
import torch
from torch import nn

from training.ema import ParamEMA


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    m[1].bias.requires_grad_(False)   # a frozen parameter has no average
    return m


def test_the_average_follows_the_weights_by_its_decay():
    m = _model()
    w0 = m[0].weight.detach().clone()
    ema = ParamEMA(m, 0.75)
    assert "1.bias" not in ema.names and len(ema.avg) == 3
    with torch.no_grad():
        m[0].weight.add_(4.0)          # as an optimizer step would
    ema.update(m)
    assert torch.allclose(ema.avg[0], w0 + 1.0)           # 0.75 * w0 + 0.25 * (w0 + 4)
    ema.update(m)
    assert torch.allclose(ema.avg[0], w0 + 1.75)          # 0.75 * (w0 + 1) + 0.25 * (w0 + 4)


def test_swapping_exchanges_and_restores():
    m = _model()
    ema = ParamEMA(m, 0.5)
    with torch.no_grad():
        m[0].weight.add_(2.0)
    ema.update(m)
    live = m[0].weight.detach().clone()
    with ema.swapped(m):
        assert torch.allclose(m[0].weight, live - 1.0)   # the average in the model
    assert torch.equal(m[0].weight, live) and torch.allclose(ema.avg[0], live - 1.0)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        ParamEMA(_model(), decay)
