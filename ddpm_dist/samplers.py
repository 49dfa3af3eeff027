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
* How the network runs (bf16 weights, channels_last, torch.compile) is decided in one place,
  `network_plan`, per device; the diffusion arithmetic stays float32 on every path.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ddpm_dist.diffusion import Generator, GaussianDiffusion, randn
from ddpm_dist.noise import SampleNoise, sample_seed
from ddpm_dist.runtime import compile_enabled, enable_cudnn_benchmark, guard_cpu_compile, memory_format

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
    """The model seen by a respaced diffusion: respaced index j → original timestep t_j."""

    def __init__(self, model: Callable, timesteps: np.ndarray | None):
        self.model = model
        self.timesteps = None if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.timesteps is not None:
            if self.timesteps.device != t.device:
                self.timesteps = self.timesteps.to(t.device)  # once, not a host-to-device copy per step
            t = self.timesteps[t]
        return self.model(x, t)


@dataclass(frozen=True)
class NetworkPlan:
    """How the sampler runs the network on one device (made by `network_plan`)."""
    dtype: torch.dtype                  # of the sampling weights and activations
    autocast: bool                      # bf16 autocast over float32 weights
    memory_format: torch.memory_format  # of the weights and of x_t
    compile: bool                       # torch.compile of the network call
    cuda_graphs: bool = False           # that call captured in a CUDA graph and replayed each step


def network_plan(device: torch.device, bf16: bool, compile: str = "auto") -> NetworkPlan:
    """The one place that decides how the network runs while sampling on `device`.

    CUDA: with bf16 the network runs on a bf16 copy of the weights, in bf16 activations (not
    autocast, which re-casts the float32 weights at every step); channels_last; compiled unless
    compile="false". CPU: the path as it was, float32 weights (bf16 autocast with bf16), the
    default layout, eager unless compile="true": Inductor's bf16 CPU code was wrong on some
    CPUs (`guard_cpu_compile`) and channels_last changes the float32 results there. Either way
    x_t, the noise and the update stay float32 (`SamplingNetwork` returns float32).

    Compiled on CUDA, the network call is also captured in a CUDA graph (torch.compile's
    "reduce-overhead"): the batch is fixed for a run (`generate_batch` pads the last one), so
    one graph is recorded and replayed at every step, one launch instead of a few hundred, and
    1000-step sampling is not bound by kernel launches."""
    cuda, compiled = device.type == "cuda", compile_enabled(compile, device)
    return NetworkPlan(dtype=torch.bfloat16 if bf16 and cuda else torch.float32, autocast=bf16 and not cuda,
                       memory_format=memory_format(device), compile=compiled, cuda_graphs=compiled and cuda)


class SamplingNetwork(nn.Module):
    """`model` as `plan` runs it: weights (a copy when their dtype changes, so the caller keeps
    its float32 weights) and input x_t in the plan's dtype and layout; returns float32."""

    def __init__(self, model: nn.Module, plan: NetworkPlan):
        super().__init__()
        if plan.dtype != torch.float32:
            model = copy.deepcopy(model).to(plan.dtype)
        self.net = model.to(memory_format=plan.memory_format)  # in place for float32: the values stay
        self.plan = plan

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.to(self.plan.dtype, memory_format=self.plan.memory_format)  # no copy on the float32 CPU path
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.plan.autocast):
            return self.net(x, t).float()


class InLayout:
    """A noise source whose draws come in `memory_format` (same values): x_T, and so every x_t,
    has the network's layout and no step converts it."""

    def __init__(self, noise: SampleNoise | Generator, device, memory_format: torch.memory_format):
        self.noise, self.device, self.memory_format = noise, device, memory_format

    def __len__(self) -> int:
        return len(self.noise)

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        return randn(shape, self.noise, self.device).to(memory_format=self.memory_format)


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
    a `SampleNoise` or a list of torch generators, one per sample. `bf16` and `compile`
    ("auto", "true", "false") are read by `network_plan` for the device of `model`'s weights."""

    def __init__(self, model: nn.Module, diffusion: GaussianDiffusion, image_shape: Sequence[int], *,
                 sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, bf16: bool = False,
                 compile: str = "auto"):
        if sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.diffusion, kept = respace(diffusion, steps)
        device = next(model.parameters()).device
        self.plan = network_plan(device, bf16, compile)
        enable_cudnn_benchmark(device)
        if self.plan.compile:
            guard_cpu_compile(device, "bf16" if bf16 else "fp32")
        # Eager: what `auto_batch_size` probes (one compile per probed batch size would be slow).
        self.network = SamplingNetwork(model, self.plan)
        # Wrapped once: the first call compiles, every later step and batch of that shape reuses it.
        # Under CUDA graphs each call's output lives until the next call, which is all a step needs.
        mode = "reduce-overhead" if self.plan.cuda_graphs else None
        network = torch.compile(self.network, mode=mode) if self.plan.compile else self.network
        # K = T keeps every step (β' = β up to rounding): the map is the identity, skip the lookup.
        self.model = TimestepMap(network, kept if len(kept) < diffusion.num_timesteps else None)
        self.image_shape, self.kind, self.eta = tuple(image_shape), sampler, eta

    def __call__(self, noise: SampleNoise | Generator, device) -> torch.Tensor:
        shape = (len(noise), *self.image_shape)
        noise = InLayout(noise, device, self.plan.memory_format)
        if self.kind == "ddim":
            return ddim_sample_loop(self.diffusion, self.model, shape, eta=self.eta, generator=noise, device=device)
        return self.diffusion.p_sample_loop(self.model, shape, generator=noise, device=device)
