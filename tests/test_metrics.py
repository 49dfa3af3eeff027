"""FID, Inception Score and streaming statistics: closed forms, references, all-reduce."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from scipy import linalg

from ddpm_dist.metrics.evaluate import inception_statistics
from ddpm_dist.metrics.fid import frechet_distance
from ddpm_dist.metrics.image_sources import ArrayImages, image_batches, open_images
from ddpm_dist.metrics.inception_score import InceptionScoreStats, split_of
from ddpm_dist.metrics.stats import FeatureStats


def _random_cov(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _closed_form_fid(mu1, s1, mu2, s2):
    """|Δmu|² + tr S1 + tr S2 − 2 tr (S1^½ S2 S1^½)^½, by symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


# ---------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    stats = FeatureStats(32)
    stats.update(torch.from_numpy(features))
    mu, sigma = stats.mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_of_two_known_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)  # do not commute
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=1e-9)
    # Diagonal covariances: d² = |Δmu|² + Σ (√a − √b)².
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_streamed_statistics_of_gaussian_samples_give_the_closed_form_fid():
    rng = np.random.default_rng(2)
    d, n = 8, 40_000
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    estimates = []
    for mu, s in ((mu1, s1), (mu2, s2)):
        stats = FeatureStats(d)
        for chunk in np.array_split(rng.multivariate_normal(mu, s, size=n), 7):
            stats.update(torch.from_numpy(chunk).float())  # float32 in, like the network
        estimates.append(stats.mean_cov())
    fid = frechet_distance(*estimates[0], *estimates[1])
    assert fid == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=0.03)


def test_feature_stats_equal_numpy_mean_and_unbiased_covariance():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((101, 12)) * 3 + 5
    stats = FeatureStats(12)
    for chunk in np.array_split(features, 4):
        stats.update(torch.from_numpy(chunk))
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)


def test_fid_with_fewer_samples_than_dimensions_stays_finite_and_near_zero():
    rng = np.random.default_rng(4)
    stats = FeatureStats(64)
    stats.update(torch.from_numpy(rng.standard_normal((6, 64))))  # rank-5 covariance
    mu, sigma = stats.mean_cov()
    fid = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(fid) and abs(fid) < 1e-3 * np.trace(sigma)


def test_fid_rejects_a_square_root_with_a_large_imaginary_part():
    # Not covariances: the product has a negative eigenvalue, so its root is imaginary.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


# ---------------------------------------------------------------- Inception Score


def _reference_inception_score(logits, splits=10):
    """OpenAI improved-gan's formula on a whole array: contiguous chunks, mean/std of exp(KL)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


def _inception_score(logits, splits=10):
    stats = InceptionScoreStats(logits.shape[1], splits)
    idx = torch.arange(len(logits))
    for chunk in torch.split(idx, 7):
        stats.update(logits[chunk], split_of(chunk, len(logits), splits))
    return stats.score()


def test_inception_score_of_a_uniform_classifier_is_one():
    mean, std = _inception_score(torch.zeros(50, 1008))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_class_count():
    classes = 7
    labels = torch.arange(10 * classes) % classes  # each split holds every class once
    logits = 1e3 * torch.nn.functional.one_hot(labels, classes).double()
    mean, std = _inception_score(logits)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_streamed_inception_score_equals_the_reference_with_uneven_splits():
    logits = torch.randn(37, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    assert _inception_score(logits) == pytest.approx(_reference_inception_score(logits.numpy()), rel=1e-10)


def test_split_of_matches_the_reference_chunks():
    n, splits = 37, 10
    expected = np.concatenate([[k] * ((k + 1) * n // splits - k * n // splits) for k in range(splits)])
    assert split_of(torch.arange(n), n, splits).tolist() == expected.tolist()


# ---------------------------------------------------------------- image sources


def test_a_folder_and_its_samples_npz_give_the_same_batches(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    for i, image in enumerate(images):  # subfolders of 2, as fid_sample.py may write
        (tmp_path / "png" / f"{i // 2:06d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "png" / f"{i // 2:06d}" / f"{i:06d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=images)
    batches = [list(image_batches(open_images(tmp_path / name), range(5), 2, num_workers=1))
               for name in ("png", "samples.npz")]
    for (idx_a, a), (idx_b, b) in zip(*batches):
        assert torch.equal(idx_a, idx_b) and torch.equal(a, b)
    assert torch.equal(batches[0][0][1][0], torch.from_numpy(images[0]).permute(2, 0, 1) / 255)


def test_bad_image_sources_are_clear_errors(tmp_path):
    np.savez(tmp_path / "keys.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="arr_0"):
        open_images(tmp_path / "keys.npz")
    with pytest.raises(ValueError, match="uint8"):
        open_images(tmp_path / "float.npz")
    with pytest.raises(FileNotFoundError):
        open_images(tmp_path / "nothing")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in size"):
        list(image_batches(open_images(tmp_path), range(2), 2))


def test_a_huge_image_in_an_evaluation_folder_is_one_line_naming_it_before_it_is_decoded(tmp_path):
    from data_helpers import huge_png
    for name in ("a.png", "c.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(huge_png(9500))
    with pytest.raises(ValueError) as info:
        list(image_batches(open_images(tmp_path), range(3), 3, num_workers=1))  # decoded in a worker
    assert str(info.value) == (f"{tmp_path / 'b.png'}: a 9500x9500 image; evaluation decodes images of "
                               f"at most 8192 pixels a side")


# ---------------------------------------------------------------- all-reduce across ranks


class _TinyFeatureNet(torch.nn.Module):
    """A real (small) network with Inception's output shapes, so the rank test runs fast. In
    float64: float32 matrix kernels round differently for different batch compositions (by
    ~1e-5 relative on AVX-512 CPUs), and the test is about the reduction, not the kernels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Linear(3 * 8 * 8, 2048).double()
        self.fc = torch.nn.Linear(2048, 1008).double()

    def forward(self, images):
        x = torch.nn.functional.interpolate(images.double(), size=(8, 8), mode="bilinear").flatten(1)
        features = torch.tanh(self.features(x))
        return features, self.fc(features)


def _images():
    rng = np.random.default_rng(6)
    return ArrayImages(rng.integers(0, 256, (23, 12, 12, 3), dtype=np.uint8))  # 23: uneven


def _statistics(rank=0, world_size=1):
    fid_stats, is_stats = inception_statistics(_TinyFeatureNet().eval(), _images(), batch_size=4,
                                               rank=rank, world_size=world_size, splits=10,
                                               progress=False)
    mu, sigma = fid_stats.mean_cov()
    return mu, sigma, is_stats.score()


def _rank_main(rank, world_size, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        mu, sigma, score = _statistics(rank, world_size)
        np.savez(f"{out_path}.{rank}.npz", mu=mu, sigma=sigma, score=np.array(score))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduced_statistics_over_two_gloo_processes_equal_single_process(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "stats")), nprocs=2)
    mu, sigma, score = _statistics()
    for rank in range(2):
        with np.load(tmp_path / f"stats.{rank}.npz") as got:
            np.testing.assert_allclose(got["mu"], mu, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(got["sigma"], sigma, rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(got["score"], score, rtol=1e-12)
    assert linalg.norm(sigma) > 0 and score[0] > 1  # the statistics are not trivial
