"""Distributed sampling and evaluation: world-size invariance, resume after SIGKILL,
the merged npz, respacing and DDIM, bits/dim over ranks, the scored JSON result.

The CLI tests run tools/fid_sample.py and tools/eval_nll.py as real processes (the local
launcher spawns real ranks on gloo). The model is a tiny U-Net whose weights are all random,
zero-initialised layers included, so every layer shapes the samples.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.config import Config, DiffusionConfig, ModelConfig
from ddpm_dist.modelio.model_file import load_model_file, save_model_file
from ddpm_dist.modelio.factory import build_model
from ddpm_dist.noise import SampleNoise
from ddpm_dist.samplers import SAMPLERS, Sampler, ddim_sample_loop, respace, sample_generators
from ddpm_dist.utils.opcount import count_ops
from ddpm_dist.evaluation.generate import (auto_batch_size, largest_power_of_two, load_png, missing_indices,
                                           sample_path, step_peak_bytes)

ROOT = Path(__file__).resolve().parents[1]
N = 12  # ≥ 10: the Inception Score has 10 splits
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _tiny_config(num_timesteps=40, channels=3) -> Config:
    model = ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                        resolution=8, in_channels=channels, out_ch=channels)
    return Config(model=model, diffusion=DiffusionConfig(num_timesteps=num_timesteps))


def _save_random_model(path: Path, channels: int = 3) -> Path:
    cfg = _tiny_config(channels=channels)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised layers too
    save_model_file(path, model.state_dict(), cfg)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return _save_random_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _tool(name: str, *args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tool_main(name: str):
    """A tool's main() in this process: the single-rank path without a process's start-up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _sample_here(model_file, out, *extra):
    argv = ["--ckpt", model_file, "--num-samples", N, "--out", out, "--seed", 7, "--device", "cpu", *extra]
    assert _tool_main("fid_sample.py")([str(a) for a in argv]) == 0


def _sample(model_file, out, *extra):
    return _tool("fid_sample.py", "--ckpt", model_file, "--num-samples", N, "--out", out, "--seed", 7,
                 "--device", "cpu", *extra)


def _pngs(out) -> dict[str, bytes]:
    """The sample PNGs (DIR/<thousands>/{i:06d}.png), not the preview grid beside result.json."""
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("[0-9]*/[0-9]*.png"))}


@pytest.fixture(scope="module")
def reference(model_file, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the samples every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    _sample_here(model_file, out, "--world-size", 1, "--batch-size", 4)
    return out


def test_world_size_3_writes_the_same_samples_as_one_process(model_file, reference, tmp_path):
    import zipfile
    _sample(model_file, tmp_path, "--world-size", 3, "--launcher", "local", "--batch-size", 2)
    assert _pngs(tmp_path) == _pngs(reference)
    assert len(_pngs(reference)) == N
    npz = f"samples_{N}x8x8x3.npz"  # the three ranks' blocks, written in place: a valid zip, the same rows
    assert zipfile.ZipFile(tmp_path / npz).testzip() is None
    with np.load(tmp_path / npz) as ours, np.load(reference / npz) as one_rank:
        np.testing.assert_array_equal(ours["arr_0"], one_rank["arr_0"])
    assert json.loads((tmp_path / "result.json").read_text())["world_size"] == 3


def test_batch_size_auto_samples_64_at_a_time_on_a_cpu_and_writes_the_same_samples(model_file, reference, tmp_path):
    _sample_here(model_file, tmp_path, "--batch-size", "auto")
    assert _pngs(tmp_path) == _pngs(reference)
    assert json.loads((tmp_path / "result.json").read_text())["runs"][0]["batch_size"] == 64


@pytest.mark.parametrize("value", ["0", "-2", "big"])
def test_a_batch_size_neither_positive_nor_auto_is_refused(value, tmp_path):
    from ddpm_dist.cli.fid_sample import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--random-init", "--num-samples", "2", "--out", str(tmp_path), "--batch-size", value])


def test_the_largest_fitting_power_of_two_is_found_by_doubling():
    assert largest_power_of_two(lambda b: b <= 300, 1024) == 256
    assert largest_power_of_two(lambda b: True, 1024) == 1024
    assert largest_power_of_two(lambda b: False, 1024) == 1
    tried = []
    largest_power_of_two(lambda b: tried.append(b) or b <= 8, 1024)
    assert tried == [2, 4, 8, 16]  # stops at the first size that does not fit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_size_auto_on_a_gpu_picks_a_power_of_two_whose_step_fits(model_file):
    model, diffusion, shape = _models(model_file)
    sampler, device = Sampler(model.cuda(), diffusion, shape), torch.device("cuda")
    batch = auto_batch_size(sampler, device)
    assert batch == 1024  # an 8×8 tiny U-Net fits at the limit
    free, _ = torch.cuda.mem_get_info(device)
    assert 0 < step_peak_bytes(sampler, batch, device) <= 0.8 * free


def test_the_npz_holds_the_pngs_in_index_order(reference):
    arr = np.load(reference / f"samples_{N}x8x8x3.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    for i in range(N):
        np.testing.assert_array_equal(arr[i], load_png(sample_path(reference, i)).permute(1, 2, 0).numpy())
    assert len({arr[i].tobytes() for i in range(N)}) == N  # distinct seeds, distinct samples


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_samples(model_file, reference, tmp_path):
    cmd = [sys.executable, str(ROOT / "tools/fid_sample.py"), "--ckpt", str(model_file), "--num-samples", str(N),
           "--out", str(tmp_path), "--seed", "7", "--device", "cpu", "--world-size", "2", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(missing_indices(tmp_path, N)) == N and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher; its ranks die with it (PR_SET_PDEATHSIG)
    proc.wait()
    time.sleep(1.0)
    done_before = N - len(missing_indices(tmp_path, N))
    assert 0 < done_before < N, f"the kill did not land mid-run ({done_before} of {N} done)"
    _sample_here(model_file, tmp_path, "--batch-size", 3)  # resumed on another world size
    assert _pngs(tmp_path) == _pngs(reference)
    assert not list(tmp_path.rglob(".*tmp*"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["runs"][0]["generated"] == N - done_before


def _models(model_file):
    model, diffusion = load_model_file(model_file)
    return model, diffusion, (3, 8, 8)


def test_respacing_keeps_alpha_bar_at_the_kept_steps(model_file):
    _, diffusion, _ = _models(model_file)
    spaced, kept = respace(diffusion, 10)
    assert kept[0] == 0 and kept[-1] == diffusion.num_timesteps - 1 and len(kept) == 10
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="--steps"):
        respace(diffusion, 1)


def test_respacing_with_all_steps_equals_the_full_ancestral_sampler(model_file):
    model, diffusion, shape = _models(model_file)
    full = diffusion.p_sample_loop(model, (3, *shape), generator=sample_generators(1, range(3)))
    spaced = Sampler(model, diffusion, shape, steps=diffusion.num_timesteps)(sample_generators(1, range(3)), "cpu")
    torch.testing.assert_close(spaced, full, rtol=0, atol=1e-5)


def test_ddim_with_eta_0_is_a_function_of_the_initial_noise_only(model_file):
    model, diffusion, shape = _models(model_file)
    spaced, kept = respace(diffusion, 8)
    from ddpm_dist.samplers import TimestepMap
    net = TimestepMap(model, kept)
    x_T = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    a = ddim_sample_loop(spaced, net, (2, *shape), eta=0.0, noise=x_T, generator=sample_generators(1, range(2)))
    b = ddim_sample_loop(spaced, net, (2, *shape), eta=0.0, noise=x_T, generator=sample_generators(2, range(2)))
    c = ddim_sample_loop(spaced, net, (2, *shape), eta=1.0, noise=x_T, generator=sample_generators(2, range(2)))
    assert torch.equal(a, b) and a.abs().max() <= 1
    assert not torch.allclose(a, c)  # with η = 1 the step noise matters


def _ops(model, diffusion, shape, kind: str, noise_of, batch: int) -> tuple[int, int]:
    """(aten ops of a whole 2-step sampling call, ops of one more reverse step) at `batch`."""
    samplers = [Sampler(model, diffusion, shape, sampler=kind, steps=k, eta=1.0) for k in (2, 3)]
    two, three = (count_ops(lambda: s(noise_of(range(batch)), "cpu")) for s in samplers)
    return two, three - two


@pytest.mark.parametrize("kind", SAMPLERS)
def test_the_ops_of_a_reverse_step_do_not_grow_with_the_batch(model_file, kind):
    model, diffusion, shape = _models(model_file)
    counter_based = lambda indices: SampleNoise(0, indices)
    assert _ops(model, diffusion, shape, kind, counter_based, 4) == _ops(model, diffusion, shape, kind,
                                                                         counter_based, 64)
    generators = lambda indices: sample_generators(0, indices)  # one randn per sample per step
    assert _ops(model, diffusion, shape, kind, generators, 64)[1] > _ops(model, diffusion, shape, kind,
                                                                         generators, 4)[1]


def test_eval_nll_is_finite_and_the_same_on_two_ranks(model_file, tmp_path):
    common = ["--ckpt", model_file, "--data", "digits", "--num-images", 6, "--batch-size", 2, "--device", "cpu"]
    assert _tool_main("eval_nll.py")([str(a) for a in common] + ["--out", str(tmp_path / "one.json")]) == 0
    _tool("eval_nll.py", *common, "--out", tmp_path / "two.json", "--world-size", 2)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert np.isfinite(one["bits_per_dim"]) and one["bits_per_dim"] > 0 and one["num_images"] == 6
    assert two["world_size"] == 2
    assert two["bits_per_dim"] == pytest.approx(one["bits_per_dim"], rel=1e-6)


def test_eval_nll_gives_a_grey_model_the_luma_of_the_test_images(tmp_path):
    from ddpm_dist.data.batch import to_model_range
    from ddpm_dist.evaluation.nll import nll_input
    from ddpm_dist.images import luma
    rgb = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    grey = nll_input(rgb, 1, 8, "cpu")
    assert grey.shape == (2, 1, 8, 8) and torch.equal(grey, to_model_range(luma(rgb)))
    assert torch.equal(nll_input(rgb, 3, 8, "cpu"), to_model_range(rgb))  # as training sees its data
    model = _save_random_model(tmp_path / "grey.safetensors", channels=1)
    argv = ["--ckpt", model, "--data", "digits", "--num-images", 4, "--batch-size", 2, "--device", "cpu",
            "--out", tmp_path / "nll.json"]
    assert _tool_main("eval_nll.py")([str(a) for a in argv]) == 0
    assert np.isfinite(json.loads((tmp_path / "nll.json").read_text())["bits_per_dim"])


def test_the_grey_demo_model_writes_grey_pngs_and_a_grey_rgb_npz_and_is_scored(tmp_path):
    """configs/demo_digits.yaml is a 1-channel model: --random-init samples it; PNGs are "L",
    the npz and the Inception network get the grey channel repeated to RGB."""
    weights = _random_inception(tmp_path / "inception.pth")
    out = tmp_path / "grey"
    argv = ["--random-init", "--config", ROOT / "configs" / "demo_digits.yaml", "--num-samples", N,
            "--out", out, "--steps", 4, "--device", "cpu", "--batch-size", 6, "--inception-weights", weights]
    assert _tool_main("fid_sample.py")([str(a) for a in argv]) == 0
    with Image.open(sample_path(out, 0)) as image:
        assert image.mode == "L" and image.size == (16, 16)
    with np.load(out / f"samples_{N}x16x16x3.npz") as data:
        arr = data["arr_0"]
    assert arr.shape == (N, 16, 16, 3) and (arr == arr[..., :1]).all() and arr.std() > 0
    assert np.isfinite(json.loads((out / "result.json").read_text())["inception_score"])
    with Image.open(out / "samples_grid.png") as grid:  # the first samples, beside result.json
        cols = math.ceil(math.sqrt(N))
        assert grid.size == (2 + cols * 18, 2 + math.ceil(N / cols) * 18)
        first = np.asarray(grid.convert("L"))[2:18, 2:18]
    with Image.open(sample_path(out, 0)) as sample:
        assert (first == np.asarray(sample)).all()


def _random_inception(path: Path) -> Path:
    """Random weights, He-scaled so that the features are O(1), not vanishing."""
    from ddpm_dist.metrics.inception import FIDInceptionV3
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


def _npz_statistics(npz: Path, weights: Path):
    from ddpm_dist.metrics.evaluate import inception_statistics
    from ddpm_dist.metrics.image_sources import open_images
    from ddpm_dist.metrics.inception import load_inception
    return inception_statistics(load_inception(weights), open_images(npz), splits=10, progress=False)


def test_scoring_over_two_ranks_equals_scoring_the_npz_in_one_process(model_file, reference, tmp_path):
    """Streaming all-reduced statistics over 2 ranks, half generated now, half read back from a
    previous run, equal the single-process pipeline's statistics of the merged npz."""
    weights = _random_inception(tmp_path / "inception.pth")
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for i in range(0, N, 2):
        sample_path(out, i).unlink()
    _sample(model_file, out, "--world-size", 2, "--batch-size", 4, "--inception-weights", weights)
    result = json.loads((out / "result.json").read_text())
    fid_stats, is_stats = _npz_statistics(out / f"samples_{N}x8x8x3.npz", weights)
    mu, sigma = fid_stats.mean_cov()
    assert np.abs(mu).max() > 1e-2 and np.abs(sigma).max() > 1e-4  # features that can differ
    with np.load(out / "inception_stats.npz") as saved:
        np.testing.assert_allclose(saved["mu"], mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(saved["sigma"], sigma, rtol=1e-9, atol=1e-12)
    assert result["inception_score"] == pytest.approx(is_stats.score()[0], rel=1e-9)
    assert result["fid"] is None and result["num_samples"] == N and result["seed"] == 7
    assert result["sampler"] == "ddpm" and result["runs"][0]["generated"] == N // 2
    assert len(result["weights_sha256"]) == 64 and "pytorch-fid" in result["pipeline"]


@pytest.mark.slow  # one 2048² scipy sqrtm: ~60 s on one core
def test_fid_against_reference_statistics_lands_in_the_json(model_file, reference, tmp_path):
    weights = _random_inception(tmp_path / "inception.pth")
    c = 0.01  # reference sigma = c·I, so tr √(Σ₁Σ₂) = √c · Σ √λ(Σ₁) without a second sqrtm
    ref_mu = np.random.default_rng(0).normal(size=2048) * 0.01
    np.savez(tmp_path / "ref.npz", mu=ref_mu, sigma=np.eye(2048) * c)
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _sample_here(model_file, out, "--inception-weights", weights, "--ref-stats", tmp_path / "ref.npz")
    mu, sigma = _npz_statistics(out / f"samples_{N}x8x8x3.npz", weights)[0].mean_cov()
    root = np.sqrt(c) * np.sqrt(np.clip(np.linalg.eigvalsh(sigma), 0, None)).sum()
    expected = ((mu - ref_mu) ** 2).sum() + np.trace(sigma) + 2048 * c - 2 * root
    assert json.loads((out / "result.json").read_text())["fid"] == pytest.approx(expected, rel=1e-4)


def test_errors_are_one_line(model_file, tmp_path):
    proc = _tool("fid_sample.py", "--ckpt", tmp_path / "nope.pt", "--num-samples", 2, "--out", tmp_path,
                 "--world-size", 2, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    with pytest.raises(SystemExit) as exit_info:
        _tool_main("fid_sample.py")(["--random-init", "--config", str(tmp_path / "missing.yaml"),
                                     "--num-samples", "2", "--out", str(tmp_path)])
    assert "missing.yaml" in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


@pytest.mark.slow  # trains 2 steps first (~20 s)
def test_a_training_checkpoint_folder_samples_and_a_wrong_config_is_one_line(tmp_path):
    run = tmp_path / "run"
    overrides = [f"out_dir={run}", "train.total_steps=2", "train.ckpt_every=2", "train.sample_every=1000",
                 "train.batch_size=4", "device=cpu", "model.resolution=8", "model.ch_mult=[1,2]",
                 "model.attn_resolutions=[]", "diffusion.num_timesteps=10"]
    subprocess.run([sys.executable, "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml", *overrides],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    common = ["--num-samples", 2, "--out", tmp_path / "samples", "--device", "cpu", "--batch-size", 2]
    _tool("fid_sample.py", "--ckpt", run, "--world-size", 2, *common)  # config.yaml of the run
    assert len(_pngs(tmp_path / "samples")) == 2
    proc = _tool("fid_sample.py", "--ckpt", run / "checkpoints", "--config", "configs/demo_digits.yaml",
                 *common, check=False)
    last = proc.stderr.strip().splitlines()[-1]  # torch's DCP may warn on lines before it
    assert proc.returncode != 0 and last.startswith("fid_sample.py: error:") and "does not fit" in last


def _other_model(tmp_path) -> Path:
    """The tiny model's architecture with other weights."""
    cfg = _tiny_config()
    torch.manual_seed(1)
    path = tmp_path / "other.safetensors"
    save_model_file(path, build_model(cfg.model).state_dict(), cfg)
    return path


def test_a_rerun_with_other_settings_is_refused_and_overwrite_resamples(model_file, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["sampler"] == "ddpm" and len(manifest["weights_sha256"]) == 64
    before = _pngs(out)
    for extra, field in (([], "weights_sha256"), (["--sampler", "ddim", "--steps", 5], "sampler")):
        ckpt = _other_model(tmp_path) if field == "weights_sha256" else model_file
        proc = _tool("fid_sample.py", "--ckpt", ckpt, "--num-samples", N, "--out", out, "--seed", 7,
                     "--device", "cpu", *extra, check=False)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and "\n" not in err and "Traceback" not in err, err
        assert field in err and "--overwrite" in err and "--out" in err, err
        assert _pngs(out) == before
    _sample(model_file, out, "--sampler", "ddim", "--steps", 5, "--overwrite")
    after = _pngs(out)
    assert len(after) == N and after != before
    assert json.loads((out / "manifest.json").read_text())["sampler"] == "ddim"
    assert json.loads((out / "result.json").read_text())["runs"][0]["generated"] == N


def test_a_larger_n_extends_a_run_and_a_smaller_n_reuses_it(model_file, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    argv = ["--ckpt", model_file, "--out", out, "--seed", 7, "--device", "cpu"]
    assert _tool_main("fid_sample.py")([str(a) for a in [*argv, "--num-samples", N - 2]]) == 0
    assert json.loads((out / "result.json").read_text())["runs"][0]["generated"] == 0
    assert _tool_main("fid_sample.py")([str(a) for a in [*argv, "--num-samples", N + 1]]) == 0
    assert json.loads((out / "result.json").read_text())["runs"][0]["generated"] == 1


def test_a_broken_png_is_regenerated(model_file, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    sample_path(out, 3).write_bytes(b"")                                   # a 0-byte file
    sample_path(out, 5).write_bytes(sample_path(out, 5).read_bytes()[:40])  # truncated
    from PIL import Image
    Image.new("RGB", (4, 4)).save(sample_path(out, 7))                      # the wrong size
    _sample_here(model_file, out)
    assert _pngs(out) == _pngs(reference)
    assert json.loads((out / "result.json").read_text())["runs"][0]["generated"] == 3


def _png_folder(out: Path, n: int, res: int) -> np.ndarray:
    from ddpm_dist.images import save_png
    images = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    for i in range(n):
        path = sample_path(out, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(torch.from_numpy(images[i]).permute(2, 0, 1), path)
    return images


def test_the_npz_merge_streams_instead_of_holding_all_samples(tmp_path):
    import tracemalloc
    from ddpm_dist.evaluation.generate import merge_npz
    n, res = 300, 64
    images = _png_folder(tmp_path, n, res)
    tracemalloc.start()
    try:
        path = merge_npz(tmp_path, n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 4, f"peak {peak} B for {images.nbytes} B of samples"
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["arr_0"], images)


def test_a_failed_npz_merge_leaves_no_file(tmp_path):
    from ddpm_dist.evaluation.generate import merge_npz, npz_path
    _png_folder(tmp_path, 5, 8)
    sample_path(tmp_path, 3).unlink()
    with pytest.raises(FileNotFoundError):
        merge_npz(tmp_path, 5)
    assert not npz_path(tmp_path, 5, 8, 8).exists() and not list(tmp_path.glob(".*"))


def test_the_manifest_records_compile_and_a_folder_from_before_the_record_resumes(model_file, reference, tmp_path,
                                                                                    monkeypatch):
    """Recorded, not compared: compiled and eager samples differ in rounding only, so a rerun with
    the other setting extends the folder, and the manifest says both were used."""
    from torch._dynamo.testing import CompileCounter
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.pop("compiled") == [False]
    (out / "manifest.json").write_text(json.dumps(manifest))  # as written before the record existed
    _sample_here(model_file, out, "--num-samples", N + 1)
    assert json.loads((out / "manifest.json").read_text())["compiled"] == [False]
    compile = torch.compile  # a counting backend: the graph runs as traced, no code is generated
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=CompileCounter(), **kw))
    _sample_here(model_file, out, "--num-samples", N + 2, "--compile", "true")
    assert json.loads((out / "manifest.json").read_text())["compiled"] == [False, True]
    assert json.loads((out / "result.json").read_text())["runs"][0]["generated"] == 1


def test_overwrite_removes_only_what_sampling_wrote(tmp_path):
    from ddpm_dist.evaluation.generate import clear_samples, npz_path, sample_path
    ours = [sample_path(tmp_path, i) for i in (0, 999, 1000)] + [npz_path(tmp_path, 2, 8, 8), tmp_path / "result.json"]
    theirs = [tmp_path / "202401" / "thesis_results.csv", tmp_path / "000000" / "notes.txt",
              tmp_path / "000001" / "000999.png",  # a PNG name that is not ours in that folder
              tmp_path / "samples_backup.npz", tmp_path / "paper.pdf"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    clear_samples(tmp_path)
    assert [p for p in ours if p.exists()] == []
    assert all(p.read_bytes() == b"x" for p in theirs)
    assert not (tmp_path / "001000").exists()  # emptied sample folders go


def test_a_huge_png_planted_among_the_samples_is_not_decoded(tmp_path):
    """The check of an existing sample reads its header first: a 9500² PNG (a few hundred KB,
    270 MB as RGB pixels) at a sample's name is refused without its pixels being decoded."""
    from data_helpers import huge_png
    (tmp_path / "000000.png").write_bytes(huge_png(9500))
    code = ("import resource, sys; from pathlib import Path; from ddpm_dist.evaluation.generate import is_sample; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; ok = is_sample(Path(sys.argv[1]), (8, 8)); "
            "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "000000.png")], capture_output=True, text=True,
                          timeout=300)
    ok, grown_kib = proc.stdout.split()
    assert ok == "False" and int(grown_kib) < 50 * 1024, proc.stdout + proc.stderr[-2000:]  # decoding: > 300 MB
