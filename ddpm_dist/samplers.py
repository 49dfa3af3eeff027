"""Samplers on top of `GaussianDiffusion`: per-sample seeding, respaced timesteps, DDIM.

* Sample i is a function of (seed, i) only: every random draw of that sample (x_T and each
  step's noise) comes from its own stream, keyed by `sample_seed(seed, i)`. `SampleNoise`
  (ddpm_dist/noise.py) draws all rows of a step in one fixed set of ops and is what
  tools/fid_sample.py uses; `sample_generators` gives one torch.Generator per sample (one
  randn call per sample per step), and `Sampler` takes either.
* Respacing (`--steps K`) keeps K of the T timesteps, evenly spaced, and derives the new β's
  from ᾱ at the kept steps, β'_j = 1 − ᾱ_{t_j} / ᾱ_{t_{j−1}}, so the marginals q(x_t | x_0)
  at kept steps are unchanged (Nichol & Dhariwal 2021, §4; improved-diffusion's respace.py).
* DDIM (Song et al. 2021, Eq. 12) with σ_t(η) of Eq. 16; η = 1 is ancestral-like, η = 0
  is deterministic given x_T.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ddpm_dist.diffusion import Generator, GaussianDiffusion, randn
from ddpm_dist.noise import SampleNoise, sample_seed

SAMPLERS = ("ddpm", "ddim")


def sample_generators(seed: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample index, on the device that draws the noise."""
    return [torch.Generator(device).manual_seed(sample_seed(seed, int(i))) for i in indices]


def respaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """K of the T timesteps, evenly spaced from 0 to T−1, both ends kept."""
    if not 2 <= steps <= num_timesteps:  # one step has no β̃_1 for the t = 0 variance
        raise ValueError(f"--steps must be in [2, {num_timesteps}], got {steps}")
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64))


class TimestepMap:
    """The model seen by a respaced diffusion: respaced index j → original timestep t_j; also
    where bf16 autocast wraps the network (the diffusion arithmetic stays in float32/64)."""

    def __init__(self, model: Callable, timesteps: np.ndarray | None, bf16: bool = False):
        self.model, self.bf16 = model, bf16
        self.timesteps = None if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.timesteps is not None:
            t = self.timesteps.to(t.device)[t]
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            return self.model(x, t)


def respace(diffusion: GaussianDiffusion, steps: int | None) -> tuple[GaussianDiffusion, np.ndarray]:
    """A diffusion over the kept timesteps with β'_j = 1 − ᾱ_{t_j}/ᾱ_{t_{j−1}}, same mean and
    variance types (so σ² = β' or β̃' as configured), and the kept timesteps."""
    T = diffusion.num_timesteps
    kept = respaced_timesteps(T, steps or T)
    alphas_cumprod = diffusion.alphas_cumprod.numpy()[kept]
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    betas = torch.from_numpy(1.0 - alphas_cumprod / prev)
    new = GaussianDiffusion(betas, model_mean_type=diffusion.model_mean_type,
                            model_var_type=diffusion.model_var_type, loss_type=diffusion.loss_type)
    return new, kept


@torch.no_grad()
def ddim_sample_loop(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], *, eta: float = 0.0,
                     noise: torch.Tensor | None = None, generator=None, device=None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}−σ²) ε̂ + σ z.
    Draws x_T and then one noise tensor per step from `generator` (a torch generator, one per
    sample, or a noise source), like `p_sample_loop`."""
    device = device if device is not None else (noise.device if noise is not None else "cpu")
    x = randn(shape, generator, device) if noise is None else noise
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
        x = ddim_step(diffusion, model, x, t, eta, randn(shape, generator, x.device))
    return x


def ddim_step(diffusion: GaussianDiffusion, model: Callable, x: torch.Tensor, t: torch.Tensor,
              eta: float, z: torch.Tensor) -> torch.Tensor:
    """One DDIM step; ε̂ is re-derived from the clipped x̂_0, as in the reference code."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=True)
    x0 = out["pred_xstart"]
    eps = ((diffusion._extract("sqrt_recip_alphas_cumprod", t, x) * x - x0)
           / diffusion._extract("sqrt_recipm1_alphas_cumprod", t, x))
    a_t = diffusion._extract("alphas_cumprod", t, x)
    a_prev = diffusion._extract("alphas_cumprod_prev", t, x)
    # Eq. 16: σ_t(η) = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t−1}); zero at t = 0 (ᾱ_{−1} = 1).
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return mean + sigma * z


class Sampler:
    """`sampler(noise, device)` → a batch of samples in [−1, 1], one row per sample of `noise`:
    a `SampleNoise` or a list of torch generators, one per sample."""

    def __init__(self, model: Callable, diffusion: GaussianDiffusion, image_shape: Sequence[int], *,
                 sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, bf16: bool = False):
        if sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.diffusion, kept = respace(diffusion, steps)
        # K = T keeps every step (β' = β up to rounding): the map is the identity, skip the lookup.
        self.model = TimestepMap(model, kept if len(kept) < diffusion.num_timesteps else None, bf16)
        self.image_shape, self.kind, self.eta = tuple(image_shape), sampler, eta

    def __call__(self, noise: SampleNoise | Generator, device) -> torch.Tensor:
        shape = (len(noise), *self.image_shape)
        if self.kind == "ddim":
            return ddim_sample_loop(self.diffusion, self.model, shape, eta=self.eta, generator=noise, device=device)
        return self.diffusion.p_sample_loop(self.model, shape, generator=noise, device=device)
