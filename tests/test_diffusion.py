"""The diffusion core against independent float64 computations (numpy/scipy, sampling, quadrature)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm_dist.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, make_beta_schedule,
                                 normal_kl, randn)
from ddpm_dist.noise import SampleNoise


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", 1000))


def oracle_eps(diffusion, x_start):
    """The ideal ε-predictor for data that is exactly x_start: inverts Eq. 4."""
    ab = diffusion.alphas_cumprod

    def model(x_t, t):
        a = ab[t].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x_start) / (1 - a).sqrt()
    return model


def eight_bit_images(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1


def test_linear_schedule_is_the_papers():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and abs(betas[-1].item() - 0.02) < 1e-15
    # Plain linspace for any T (no 1000/T rescaling).
    np.testing.assert_array_equal(make_beta_schedule("linear", 10).numpy(), np.linspace(1e-4, 0.02, 10))


def test_cosine_schedule_matches_its_alpha_bar():
    betas = make_beta_schedule("cosine", 1000)
    assert betas.dtype == torch.float64 and bool((betas > 0).all() and (betas <= 0.999).all())
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert abs(alpha_bar[499].item() - f(500) / f(0)) < 1e-9
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("quadratic", 10)


def test_tables_are_float64(diffusion):
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "model_variance"):
        assert getattr(diffusion, name).dtype == torch.float64, name


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_moments_match_eq4(diffusion, t):
    n = 200_000
    x0 = torch.tensor([-0.8, 0.0, 0.5]).repeat(n, 1).view(n, 3, 1, 1)
    tt = torch.full((n,), t, dtype=torch.long)
    xt = diffusion.q_sample(x0, tt).double()
    ab = diffusion.alphas_cumprod[t].item()
    mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
    expected_mean = math.sqrt(ab) * torch.tensor([-0.8, 0.0, 0.5], dtype=torch.float64)
    # 6 standard errors: a failure is a bug, not bad luck.
    assert torch.allclose(mean, expected_mean, atol=6 * math.sqrt((1 - ab) / n))
    assert torch.allclose(var, torch.full((3,), 1 - ab, dtype=torch.float64), rtol=6 * math.sqrt(2 / n))


@pytest.mark.parametrize("t", [1, 5, 100, 900])
def test_posterior_matches_bayes_rule(diffusion, t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated on a fine grid."""
    x0, xt = 0.3, -0.4
    beta, ab_prev = diffusion.betas[t].item(), diffusion.alphas_cumprod[t - 1].item()
    grid = np.linspace(-6, 6, 400_001)
    log_w = (stats.norm.logpdf(xt, math.sqrt(1 - beta) * grid, math.sqrt(beta))
             + stats.norm.logpdf(grid, math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)))
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    num_mean = (w * grid).sum()
    num_var = (w * (grid - num_mean) ** 2).sum()
    mean, var, log_var = diffusion.q_posterior_mean_variance(
        torch.full((1, 1), x0, dtype=torch.float64), torch.full((1, 1), xt, dtype=torch.float64),
        torch.tensor([t]))
    assert abs(mean.item() - num_mean) < 1e-6 * max(1, abs(num_mean))
    assert abs(var.item() - num_var) < 1e-6 * num_var
    assert abs(log_var.item() - math.log(num_var)) < 1e-5


def test_fixedlarge_uses_posterior_variance_of_t1_at_t0():
    d = GaussianDiffusion(make_beta_schedule("linear", 1000), model_var_type="fixedlarge")
    assert d.model_variance[0] == d.posterior_variance[1]
    assert torch.equal(d.model_variance[1:], d.betas[1:])
    small = GaussianDiffusion(make_beta_schedule("linear", 1000), model_var_type="fixedsmall")
    assert torch.equal(small.model_variance, small.posterior_variance)
    assert small.model_log_variance[0] == small.posterior_log_variance_clipped[1]


def test_normal_kl_against_quadrature():
    m1, s1, m2, s2 = 0.3, 0.7, -0.2, 1.3
    grid = np.linspace(-12, 12, 200_001)
    p, q = stats.norm.pdf(grid, m1, s1), stats.norm.pdf(grid, m2, s2)
    numeric = np.trapezoid(p * (np.log(p) - np.log(q)), grid)
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, 2 * math.log(s1), m2, 2 * math.log(s2))))
    assert abs(kl.item() - numeric) < 1e-8


def test_decoder_likelihood_against_scipy():
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.0 + 1 / 255, 1 - 2 / 255, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.95, 0.02, 0.98, 0.5], dtype=torch.float64)
    log_scales = torch.tensor([-3.0, -4.0, -2.0, -5.0, -1.0], dtype=torch.float64)
    ours = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).numpy()
    xs, mu, sd = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    lo = np.where(xs < -0.999, -np.inf, xs - 1 / 255)
    hi = np.where(xs > 0.999, np.inf, xs + 1 / 255)
    expected = np.log(stats.norm.cdf(hi, mu, sd) - stats.norm.cdf(lo, mu, sd))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # The 256 bins partition the real line: their probabilities sum to 1.
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    total = discretized_gaussian_log_likelihood(bins, means=torch.full_like(bins, 0.1),
                                                log_scales=torch.full_like(bins, -2.5)).exp().sum()
    assert abs(total.item() - 1) < 1e-9


def test_vb_terms_against_independent_float64(diffusion):
    """L_{t-1} for t>0 (a Gaussian KL) and L_0 (the decoder) recomputed with scipy."""
    x0 = eight_bit_images((2, 3, 4, 4)).double()
    model = lambda x, t: torch.full_like(x, 0.25)  # a fixed, wrong ε-prediction
    for t_val in (0, 1, 400):
        t = torch.full((2,), t_val, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t)
        bpd, _ = diffusion._vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)
        ab, a = diffusion.alphas_cumprod[t_val].item(), 1 - diffusion.betas[t_val].item()
        pred_x0 = (x_t.numpy() - math.sqrt(1 - ab) * 0.25) / math.sqrt(ab)
        ab_prev = diffusion.alphas_cumprod_prev[t_val].item()
        beta = diffusion.betas[t_val].item()
        coef1, coef2 = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(a) / (1 - ab)
        p_mean = coef1 * pred_x0 + coef2 * x_t.numpy()
        p_var = diffusion.model_variance[t_val].item()
        if t_val == 0:
            xs = x0.numpy()
            lo, hi = np.where(xs < -0.999, -np.inf, xs - 1 / 255), np.where(xs > 0.999, np.inf, xs + 1 / 255)
            terms = -np.log(stats.norm.cdf(hi, p_mean, math.sqrt(p_var)) - stats.norm.cdf(lo, p_mean, math.sqrt(p_var)))
        else:
            q_mean = coef1 * x0.numpy() + coef2 * x_t.numpy()
            q_var = beta * (1 - ab_prev) / (1 - ab)
            terms = 0.5 * (np.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1)
        expected = terms.reshape(2, -1).mean(1) / math.log(2)
        np.testing.assert_allclose(bpd.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_bound_of_oracle_is_below_zero_model(diffusion):
    x0 = eight_bit_images((3, 3, 8, 8))
    oracle = diffusion.calc_bpd_loop(oracle_eps(diffusion, x0), x0)
    zero = diffusion.calc_bpd_loop(lambda x, t: torch.zeros_like(x), x0)
    assert oracle["vb"].shape == (3, 1000) and oracle["prior_bpd"].shape == (3,)
    torch.testing.assert_close(oracle["total_bpd"], oracle["vb"].sum(1) + oracle["prior_bpd"])
    assert bool((oracle["total_bpd"] < zero["total_bpd"] - 3).all())
    assert bool((oracle["prior_bpd"] < 1e-4).all())  # L_T ≈ 0 for the paper's schedule


def test_calc_bpd_loop_calls_model_once_per_t(diffusion):
    calls = []
    model = lambda x, t: calls.append(t.clone()) or torch.zeros_like(x)
    diffusion.calc_bpd_loop(model, eight_bit_images((2, 3, 4, 4)))
    assert len(calls) == 1000 and [c[0].item() for c in calls] == list(range(999, -1, -1))


def test_p_sample_adds_no_noise_at_t0(diffusion):
    x_t = torch.randn(4, 3, 4, 4)
    model = lambda x, t: torch.zeros_like(x)
    t = torch.tensor([0, 0, 5, 5])
    mean = diffusion.p_mean_variance(model, x_t, t)["mean"]
    out = diffusion.p_sample(model, x_t, t, noise=torch.full_like(x_t, 10.0))
    torch.testing.assert_close(out[:2], mean[:2], rtol=0, atol=0)
    assert (out[2:] - mean[2:]).abs().min() > 0.1


def test_p_sample_loop_is_repeated_p_sample_with_per_step_noise():
    d = GaussianDiffusion(make_beta_schedule("linear", 20))
    model = lambda x, t: 0.1 * x + 0.01 * t.view(-1, 1, 1, 1).float()
    loop = d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for i in range(19, -1, -1):
        x = d.p_sample(model, x, torch.full((2,), i), noise=torch.randn(2, 3, 4, 4, generator=g))
    torch.testing.assert_close(loop, x, rtol=0, atol=0)


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    d = GaussianDiffusion(make_beta_schedule("linear", 10))
    model = lambda x, t: 0.5 * x
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = d.p_sample_loop(model, (3, 3, 4, 4), generator=gens([11, 12, 13]))
    alone = d.p_sample_loop(model, (1, 3, 4, 4), generator=gens([12]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    assert randn((2, 3), gens([1, 2])).shape == (2, 3)


def test_a_noise_source_makes_a_sample_independent_of_its_batch():
    d = GaussianDiffusion(make_beta_schedule("linear", 10))
    model = lambda x, t: 0.5 * x
    batch = d.p_sample_loop(model, (3, 3, 4, 4), generator=SampleNoise(0, [11, 12, 13]))
    alone = d.p_sample_loop(model, (1, 3, 4, 4), generator=SampleNoise(0, [12]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "mean"])
def test_every_mean_type_has_the_same_optimum(mean_type):
    """The ideal model of each parametrisation gives the true posterior mean and zero L_simple."""
    d = GaussianDiffusion(make_beta_schedule("linear", 1000), model_mean_type=mean_type)
    x0 = eight_bit_images((2, 3, 4, 4))
    t = torch.tensor([3, 700])
    noise = torch.randn_like(x0)
    x_t = d.q_sample(x0, t, noise)
    true_mean = d.q_posterior_mean_variance(x0, x_t, t)[0]
    ideal = {"eps": lambda x, tt: noise, "xstart": lambda x, tt: x0, "mean": lambda x, tt: true_mean}[mean_type]
    out = d.p_mean_variance(ideal, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["mean"], true_mean, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=2e-3, rtol=1e-3)
    assert d.training_losses(ideal, x0, t, noise=noise).abs().max() < 1e-10


def test_training_losses_kl_is_the_bound_term(diffusion):
    kl_diff = GaussianDiffusion(diffusion.betas, loss_type="kl")
    x0 = eight_bit_images((2, 3, 4, 4))
    t = torch.tensor([0, 300])
    noise = torch.randn_like(x0)
    model = lambda x, tt: torch.zeros_like(x)
    loss = kl_diff.training_losses(model, x0, t, noise=noise)
    expected, _ = kl_diff._vb_terms_bpd(model, x0, kl_diff.q_sample(x0, t, noise), t, clip_denoised=False)
    torch.testing.assert_close(loss, expected)
    assert loss.shape == (2,)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="model_var_type 'learned'"):
        GaussianDiffusion(make_beta_schedule("linear", 10), model_var_type="learned")
