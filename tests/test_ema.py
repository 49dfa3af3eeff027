"""The EMA against its closed form, the swap, and the state dict (single process; the sharded
cases run in tests/test_engines.py)."""
from __future__ import annotations

import pytest
import torch

from ddpm_dist.training.ema import EMA


def test_constant_target_closed_form():
    # Params jump from 0 to c and stay: after k updates ema = c * (1 - decay^k).
    decay, c = 0.9, 3.0
    p = torch.zeros(5)
    ema = EMA([p], decay)
    p.fill_(c)
    for k in range(1, 21):
        ema.update([p])
        torch.testing.assert_close(ema.shadow[0], torch.full((5,), c * (1 - decay ** k)))


def test_linear_drift_closed_form():
    # Params p_k = k * d (constant updates): ema_k = sum_j (1-a) a^(k-j) j d, a = decay.
    decay, d = 0.95, torch.tensor([0.5, -1.0], dtype=torch.float64)
    p = torch.zeros(2)
    ema = EMA([p], decay)
    for k in range(1, 31):
        p.copy_(k * d)
        ema.update([p])
    expected = sum((1 - decay) * decay ** (30 - j) * j * d for j in range(1, 31))
    torch.testing.assert_close(ema.shadow[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_ema_is_fp32_for_low_precision_params():
    p = torch.ones(3, dtype=torch.bfloat16)
    ema = EMA([p], 0.5)
    ema.update([p * 3])
    assert ema.shadow[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 2.0))


def test_swap_into_restores_live_weights():
    model = torch.nn.Linear(4, 2)
    params = list(model.parameters())
    live = [p.detach().clone() for p in params]
    ema = EMA(params, 0.9)
    for s in ema.shadow:
        s.fill_(7.0)
    with ema.swap_into(params):
        assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in params)
        out = model(torch.ones(1, 4))
    assert torch.equal(out, torch.full((1, 2), 35.0))
    assert all(torch.equal(p, q) for p, q in zip(params, live))
    with pytest.raises(RuntimeError), ema.swap_into(params):
        raise RuntimeError("sampling failed")
    assert all(torch.equal(p, q) for p, q in zip(params, live)), "restored after an error too"


def test_state_dict_round_trip():
    params = [torch.randn(3), torch.randn(2, 2)]
    ema = EMA(params, 0.99, names=["a", "b"])
    other = EMA([torch.zeros(3), torch.zeros(2, 2)], 0.99, names=["a", "b"])
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(ema.shadow, other.shadow))
    with pytest.raises(KeyError, match="b"):
        other.load_state_dict({"a": torch.zeros(3)})
