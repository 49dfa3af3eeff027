"""Per-sample normal noise for a whole batch in a fixed number of tensor ops.

Row i of every draw belongs to one sample: its values are a pure function of (the sample's
64-bit key, the draw number k, the element index), so a sample does not depend on its batch,
its rank or the batch size, and the number of ops of a draw does not grow with the batch.

* The key of sample `index` of a run seeded `seed` is `derive_seed(seed, index)`.
* The bits are Philox-4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers:
  as easy as 1, 2, 3"): key = the sample key's two 32-bit halves, counter = (block j, 0, k, 0)
  with j, k < 2³². Block j gives elements 4j … 4j+3 of the draw; Philox is a bijection of
  the counter for a fixed key, so no two (draw, block) of a sample share their bits.
* The arithmetic is int64: a 32×32-bit product fits in 64 bits; where it exceeds 2⁶³ the int64
  wraps and keeps the bit pattern of the unsigned product, so `(p >> 32) & MASK` is its high
  half and `p & MASK` its low half. Integer results are exact on every device.
* Box–Muller turns two 32-bit words into two normals, in float64, then cast to float32. The
  float64 log / sqrt / cos / sin of CPU and CUDA agree to about one float64 ulp, so the float32
  noise agrees except where a value lies within that ulp of a float32 rounding boundary.
  The largest |z| is √(−2 ln 2⁻³²) ≈ 6.66.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddpm_dist.utils.seeds import derive_seed

NOISE = "philox4x32-10+box-muller"  # recorded in sample manifests: other noise, other images
MASK = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)   # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)   # key increments per round (Weyl sequence)
PHILOX_ROUNDS = 10

# A 32-bit word: an int64 tensor of values in [0, 2³²) or a Python int in that range; the
# Philox functions below work on either and on any mix of broadcastable shapes.
Word = torch.Tensor | int


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit key of sample `index` of a run seeded `seed` (its generator seed too)."""
    return derive_seed(seed, index)


def philox_round_keys(k0: Word, k1: Word) -> list[tuple[Word, Word]]:
    """The key of each of the 10 rounds: round r adds r·W to each half, mod 2³²."""
    return [((k0 + r * PHILOX_W[0]) & MASK, (k1 + r * PHILOX_W[1]) & MASK) for r in range(PHILOX_ROUNDS)]


def _mulhilo(m: int, c: Word) -> tuple[Word, Word]:
    """High and low 32 bits of the 64-bit product m·c (wrapping int64 for tensors)."""
    p = c * m
    return (p >> 32) & MASK, p & MASK


def philox4x32(counter: Sequence[Word], round_keys: list[tuple[Word, Word]]) -> tuple[Word, Word, Word, Word]:
    """Philox-4x32-10 of the four counter words under the given round keys."""
    c0, c1, c2, c3 = counter
    for k0, k1 in round_keys:
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent float64 normals from two 32-bit words: u = (a + 1)/2³² ∈ (0, 1],
    θ = 2π b/2³² ∈ [0, 2π), z = √(−2 ln u) (cos θ, sin θ)."""
    r = torch.sqrt(-2.0 * torch.log((a.double() + 1.0) * 2.0 ** -32))
    theta = b.double() * (2.0 * math.pi * 2.0 ** -32)
    return r * torch.cos(theta), r * torch.sin(theta)


class SampleNoise:
    """The noise of samples `indices` of a run seeded `seed`: each `draw(shape)` returns the
    next standard normal float32 tensor of `shape`, row i from sample `indices[i]`."""

    def __init__(self, seed: int, indices: Sequence[int], device="cpu"):
        keys = [sample_seed(seed, int(i)) for i in indices]
        halves = torch.tensor([[k & MASK, k >> 32] for k in keys], dtype=torch.int64, device=device)
        self.round_keys = philox_round_keys(halves[:, :1], halves[:, 1:])  # [B, 1] each
        self.rows, self.device, self.draws = len(keys), torch.device(device), 0

    def __len__(self) -> int:
        return self.rows

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        assert shape[0] == self.rows, f"{self.rows} samples for a batch of {shape[0]}"
        n = math.prod(shape[1:])
        blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=self.device)[None]  # [1, J]
        assert blocks.shape[1] <= MASK and self.draws <= MASK
        x0, x1, x2, x3 = philox4x32((blocks, 0, self.draws, 0), self.round_keys)  # each [B, J]
        self.draws += 1
        z = torch.stack([*box_muller(x0, x1), *box_muller(x2, x3)], dim=-1)  # [B, J, 4]
        return z.reshape(self.rows, -1)[:, :n].float().reshape(tuple(shape))
