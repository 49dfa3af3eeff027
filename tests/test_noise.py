"""Per-sample counter-based noise (ddpm_dist/noise.py): Philox-4x32-10 against the published
known answers, the normals' distribution (moments, Kolmogorov–Smirnov, correlations), no
repeated bits between a sample's draws, and a sample's noise independent of its batch."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from ddpm_dist.noise import MASK, SampleNoise, philox4x32, philox_round_keys

# Random123's known-answer vectors for Philox-4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
N = 1_000_000


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_matches_the_known_answers_on_ints_and_int64_tensors(counter, key, expected):
    assert philox4x32(counter, philox_round_keys(*key)) == expected
    words = philox4x32([torch.tensor([w]) for w in counter], philox_round_keys(*map(torch.tensor, key)))
    assert tuple(int(w) for w in words) == expected  # the int64 tensor path wraps like uint32


@pytest.fixture(scope="module")
def normals() -> torch.Tensor:
    """Two successive draws of 100 samples × 10⁴ values: [2, 100, 10⁴] float64."""
    noise = SampleNoise(0, range(100))
    return torch.stack([noise.draw((100, N // 100)) for _ in range(2)]).double()


def test_moments_of_a_million_draws_are_those_of_a_standard_normal(normals):
    z = normals[0].flatten().numpy()
    n = z.size
    standard_errors = {"mean": (z.mean(), 1 / np.sqrt(n)), "var - 1": (z.var() - 1, np.sqrt(2 / n)),
                       "skew": (scipy.stats.skew(z), np.sqrt(6 / n)),
                       "excess kurtosis": (scipy.stats.kurtosis(z), np.sqrt(24 / n))}
    for name, (value, se) in standard_errors.items():
        assert abs(value) < 4 * se, f"{name} = {value:.2e}, standard error {se:.1e}"


def test_a_million_draws_pass_kolmogorov_smirnov_against_n01(normals):
    assert scipy.stats.kstest(normals[0].flatten().numpy(), "norm").pvalue > 1e-3


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_neighbouring_samples_elements_and_successive_draws_are_uncorrelated(normals):
    first, second = normals
    pairs = {"neighbouring samples": (first[:-1], first[1:]),
             "neighbouring elements": (first[:, :-1], first[:, 1:]),
             "successive draws": (first, second)}
    for name, (a, b) in pairs.items():
        bound = 4 / np.sqrt(a.numel())
        assert abs(_corr(a, b)) < bound, name
        assert abs(_corr(a ** 2, b ** 2)) < 2 * bound, f"{name}: squares"  # a shared radius would show here


def test_neighbouring_seeds_give_uncorrelated_noise():
    a = SampleNoise(0, range(10)).draw((10, 10_000)).double()
    b = SampleNoise(1, range(10)).draw((10, 10_000)).double()
    assert abs(_corr(a, b)) < 4 / np.sqrt(a.numel())


def test_no_two_draws_or_samples_share_a_block_of_bits():
    noise = SampleNoise(3, range(4))
    draws = torch.stack([noise.draw((4, 3, 16, 16)) for _ in range(200)])  # each block: 4 normals
    blocks = draws.numpy().reshape(-1, 4).view(np.dtype((np.void, 16)))
    assert len(np.unique(blocks)) == len(blocks) == 200 * 4 * 3 * 16 * 16 // 4


def test_a_samples_noise_depends_on_seed_and_index_only():
    batch, alone = SampleNoise(5, [7, 2, 9]), SampleNoise(5, [2])
    for _ in range(3):
        assert torch.equal(batch.draw((3, 3, 4, 4))[1:2], alone.draw((1, 3, 4, 4)))
    other_shape = SampleNoise(5, [2]).draw((1, 10))
    assert torch.equal(other_shape, SampleNoise(5, [2]).draw((1, 3, 4, 4)).reshape(1, -1)[:, :10])
    assert not torch.equal(SampleNoise(5, [2]).draw((1, 8)), SampleNoise(6, [2]).draw((1, 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_noise_of_the_cpu():
    cpu, cuda = SampleNoise(11, range(64)), SampleNoise(11, range(64), "cuda")
    for _ in range(2):
        a, b = cpu.draw((64, 3, 32, 32)), cuda.draw((64, 3, 32, 32)).cpu()
        torch.testing.assert_close(b, a, rtol=2 ** -23, atol=0)  # ≤ 1 float32 ulp, see noise.py
        assert (a != b).float().mean() < 1e-5
