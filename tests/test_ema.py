"""The EMA against its closed form, the swap, and the state dict (single process; the sharded
cases run in tests/test_engines.py)."""
from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

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


class ForeachRoute(TorchDispatchMode):
    """Records every aten op, and each foreach op that CUDA's fused multi-tensor route would refuse:
    that route needs element i of every tensor-list argument to match element i of the first list
    in shape, strides and dtype (a 0-d weight per tensor does not; it takes one kernel per tensor)."""

    def __init__(self):
        super().__init__()
        self.ops, self.refused = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if lists and any(x.shape != y.shape or x.stride() != y.stride() or x.dtype != y.dtype
                         for other in lists[1:] for x, y in zip(lists[0], other)):
            self.refused.append(str(func))
        return func(*args, **(kwargs or {}))


def params_of(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [torch.randn(*shape, generator=g) for shape in [(7,), (3, 5), (2, 3, 3, 3)] * n][:n]


@pytest.mark.parametrize("skip", [None, torch.tensor(0.0), torch.tensor(1.0)])
def test_an_update_is_a_fixed_number_of_fused_foreach_ops_whatever_the_number_of_tensors(skip):
    ops = {}
    for n in (3, 40):
        params = params_of(n)
        ema = EMA(params, 0.9999)
        with ForeachRoute() as route:
            ema.update(params, skip=skip)
        assert not route.refused, f"{n} tensors: {route.refused} would run one kernel per tensor"
        ops[n] = route.ops
    assert ops[3] == ops[40], "the ops of an update grow with the number of tensors"
    assert len(ops[3]) <= 6


def todays_update(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float, skip) -> None:
    """The update as it was: lerp with a Python weight, or a 0-d weight tensor per parameter."""
    if skip is None:
        torch._foreach_lerp_(shadow, params, 1.0 - decay)
    else:
        torch._foreach_lerp_(shadow, params, [(1.0 - skip) * (1.0 - decay)] * len(params))


@pytest.mark.parametrize("decay", [0.9999, 0.9, 0.3])
def test_an_update_is_bit_for_bit_the_lerp_it_replaces(decay):
    """decay 0.9 and 0.3: where a separate multiply and add would round differently from lerp."""
    params = params_of(12)
    ema = EMA(params, decay)
    reference = [s.clone() for s in ema.shadow]
    g = torch.Generator().manual_seed(3)
    for step, skip in enumerate([None, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0), None]):
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * (0.01 if step % 2 else 1.0))
        ema.update(params, skip=skip)
        todays_update(reference, params, decay, skip)
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow, reference)), f"step {step}"
