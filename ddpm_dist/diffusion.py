"""Gaussian diffusion of Ho, Jain & Abbeel (2020): forward process, posterior, reverse process,
L_simple and the variational bound in bits/dim. Method names follow the original code
(`diffusion_tf/diffusion_utils_2.py`), equation numbers follow the paper.

Conventions: all schedule tables are float64 (float32 tables drift ~2e-4); a model is any
callable `model(x_t, t)` with `t` a LongTensor [B]; a batch may mix timesteps. The decoder
L_0 uses the exact normal CDF (`torch.special.ndtr`/`log_ndtr`), not the original code's tanh
approximation, over 8-bit bins with open edge bins.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch


class NoiseSource(Protocol):
    """Per-sample noise drawn for a whole batch at once (e.g. `ddpm_dist.noise.SampleNoise`):
    each `draw(shape)` is the next standard normal tensor, row i from sample i alone."""

    def __len__(self) -> int: ...

    def draw(self, shape: Sequence[int]) -> torch.Tensor: ...


Generator = torch.Generator | Sequence[torch.Generator] | NoiseSource | None


def make_beta_schedule(schedule: str, num_timesteps: int) -> torch.Tensor:
    """β_1..β_T as a float64 tensor [T]."""
    if schedule == "linear":
        # Paper §4: β linear from 1e-4 to 0.02 (plain linspace for any T).
        return torch.from_numpy(np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64))
    if schedule == "cosine":
        # Nichol & Dhariwal 2021, Eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β ≤ 0.999.
        s = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.from_numpy(np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999))
    raise ValueError(f"unknown beta schedule {schedule!r}; choose 'linear' or 'cosine'")


def randn(shape: Sequence[int], generator: Generator = None, device=None) -> torch.Tensor:
    """Standard normal noise. With a list of generators, row i of the batch comes from generator
    i alone, so a sample does not depend on which other samples share its batch; a noise
    source gives the same property with a number of ops that does not grow with the batch
    (on the source's device)."""
    if hasattr(generator, "draw"):
        return generator.draw(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(*shape, generator=generator, device=device)
    assert len(generator) == shape[0], f"{len(generator)} generators for a batch of {shape[0]}"
    return torch.stack([torch.randn(*shape[1:], generator=g, device=device) for g in generator])


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (Eq. 5's Gaussian KLs)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data x in [-1, 1] on 256 bins of width 2/255 under N(means, e^{2 log_scales})
    (Eq. 13); the first and last bins extend to -∞ and +∞."""
    assert x.shape == means.shape == log_scales.shape
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper, lower = inv_std * (centered + 1 / 255), inv_std * (centered - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)          # log P(X ≤ upper edge)
    log_sf_lower = torch.special.log_ndtr(-lower)          # log P(X > lower edge)
    mid = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_mid = torch.log(mid.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


class GaussianDiffusion:
    """Forward process q, reverse process p_θ and their losses for a fixed β schedule."""

    def __init__(self, betas: torch.Tensor, model_mean_type: str = "eps",
                 model_var_type: str = "fixedlarge", loss_type: str = "mse"):
        for name, value, allowed in (("model_mean_type", model_mean_type, ("eps", "xstart", "mean")),
                                     ("model_var_type", model_var_type, ("fixedlarge", "fixedsmall")),
                                     ("loss_type", loss_type, ("mse", "kl"))):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        betas = torch.as_tensor(betas, dtype=torch.float64)
        assert betas.ndim == 1 and bool((betas > 0).all() and (betas <= 1).all())
        self.num_timesteps = len(betas)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)                                   # ᾱ_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # Eq. 7: β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t; its log is clipped at t=0, where β̃_0 = 0.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        # Eq. 7: μ̃_t = coef1 · x_0 + coef2 · x_t.
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        if model_var_type == "fixedlarge":
            # σ²_t = β_t (§3.2), except t=0, which takes β̃_1 as in the original code.
            self.model_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
            self.model_log_variance = torch.log(self.model_variance)
        else:
            # σ²_t = β̃_t (§3.2).
            self.model_variance = self.posterior_variance
            self.model_log_variance = self.posterior_log_variance_clipped
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [B, 1, ..., 1] in x's dtype; tables are cached per device in float64."""
        tables = self._device_tables.setdefault(t.device, {})
        if name not in tables:
            tables[name] = getattr(self, name).to(t.device)
        out = tables[name][t].to(x.dtype)
        return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    # ---- forward process q ------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start).neg().add(1.0).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 4 reparametrised: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε."""
        noise = torch.randn_like(x_start) if noise is None else noise
        assert noise.shape == x_start.shape
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Eqs. 6–7: q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) → (mean, variance, log_variance_clipped)."""
        assert x_start.shape == x_t.shape
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- reverse process p_θ ----------------------------------------------------------------
    def predict_start_from_noise(self, x_t, t, eps):
        """Eq. 4 inverted: x_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_start_from_prev(self, x_t, t, x_prev):
        """Eq. 7 inverted: x_0 = (μ̃ - coef2 · x_t) / coef1."""
        return ((x_prev - self._extract("posterior_mean_coef2", t, x_t) * x_t)
                / self._extract("posterior_mean_coef1", t, x_t))

    def p_mean_variance(self, model: Callable, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True) -> dict:
        """Mean and fixed variance of p_θ(x_{t-1} | x_t) (Eq. 1, §3.2) and the implied x_0."""
        output = model(x_t, t).to(x_t.dtype)
        assert output.shape == x_t.shape, f"model output {tuple(output.shape)} != input {tuple(x_t.shape)}"
        clip = (lambda x: x.clamp(-1.0, 1.0)) if clip_denoised else (lambda x: x)
        if self.model_mean_type == "mean":
            # The paper's ablation: predict μ̃ directly.
            mean, pred_xstart = output, clip(self.predict_start_from_prev(x_t, t, output))
        else:
            raw = self.predict_start_from_noise(x_t, t, output) if self.model_mean_type == "eps" else output
            pred_xstart = clip(raw)
            # Eq. 11 is this posterior mean with x_0 = the model's prediction.
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        variance = self._extract("model_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("model_log_variance", t, x_t).expand_as(x_t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model: Callable, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 clip_denoised: bool = True) -> torch.Tensor:
        """Algorithm 2, one step: x_{t-1} = μ_θ(x_t, t) + σ_t z, with z = 0 where t = 0."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        noise = torch.randn_like(x_t) if noise is None else noise
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop(self, model: Callable, shape: Sequence[int], noise: torch.Tensor | None = None,
                      generator: Generator = None, device=None, progress: bool = False) -> torch.Tensor:
        """Algorithm 2: x_T ~ N(0, I), then p_sample for t = T-1 … 0. With one generator per
        sample or a noise source, sample i depends on its own noise only."""
        device = device if device is not None else (noise.device if noise is not None else "cpu")
        img = randn(shape, generator, device) if noise is None else noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="sampling", unit="step")
        for i in steps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=img.device)
            img = self.p_sample(model, img, t, noise=randn(shape, generator, img.device))
        return img

    # ---- losses -----------------------------------------------------------------------------
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised: bool):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t > 0, and the decoder
        L_0 = -log p_θ(x_0|x_1) for t = 0 (Eq. 5), in bits per dimension."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl), out["pred_xstart"]

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example loss [B]: L_simple (Eq. 14) for "mse", the true bound term L_t for "kl"."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        if self.loss_type == "kl":
            return self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False)[0]
        target = {"eps": noise, "xstart": x_start,
                  "mean": self.q_posterior_mean_variance(x_start, x_t, t)[0]}[self.model_mean_type]
        output = model(x_t, t)
        assert output.shape == x_start.shape
        return mean_flat((target - output.float()) ** 2)

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim (Eq. 5); ~0 for the paper's schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model: Callable, x_start: torch.Tensor, clip_denoised: bool = True,
                      progress: bool = False, generator: Generator = None) -> dict:
        """The full variational bound L = L_T + Σ_{t>1} L_{t-1} + L_0 (Eq. 5) in bits/dim, one model
        call per t on the whole batch → total_bpd [B], prior_bpd [B], vb [B, T], mse [B, T].
        With one generator per image or a noise source, image i's q_sample noise is its own."""
        B, T = x_start.shape[0], self.num_timesteps
        vb = torch.zeros(B, T, dtype=torch.float64, device=x_start.device)
        mse = torch.zeros_like(vb)
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="bits/dim", unit="step")
        for i in steps:
            t = torch.full((B,), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start) if generator is None else randn(x_start.shape, generator, x_start.device)
            x_t = self.q_sample(x_start, t, noise=noise.to(x_start.dtype))
            vb[:, i], pred_xstart = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised)
            mse[:, i] = mean_flat((pred_xstart - x_start) ** 2)
        prior = self.prior_bpd(x_start).double()
        return {"total_bpd": vb.sum(1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse}
