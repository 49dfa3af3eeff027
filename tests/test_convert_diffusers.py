"""diffusers interop: a randomised UNet2DModel with the google/ddpm-* topology, saved, imported
and exported again, computes what diffusers computes; one reverse step equals DDPMScheduler's.

Needs diffusers (a test dependency); nothing is downloaded.
"""
import inspect
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from ddpm_dist.modelio import diffusers_format as cd
from ddpm_dist.modelio.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[1]
PAPER_UNET = dict(layers_per_block=2, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None,
                  flip_sin_to_cos=False, freq_shift=1, act_fn="silu", norm_num_groups=32)
# google/ddpm-cifar10-32: the paper's CIFAR-10 network (35.7M parameters), attention at 16².
CIFAR10 = dict(PAPER_UNET, sample_size=32, block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# The 256² layout (6 levels, ch_mult 1,1,2,2,4,4) at ch 32 and 64², attention at 16² (level 2).
SMALL_256_STYLE = dict(PAPER_UNET, sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                         "DownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D",
                                       "UpBlock2D", "UpBlock2D"))


def randomised_unet(topology: dict, seed: int = 0) -> UNet2DModel:
    """UNet2DModel with every tensor random, the zero-initialised convs too, so each one counts."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**topology).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim > 1:  # fan-in scaling keeps activations O(1) through ~30 blocks
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            else:  # norm scales near 1, biases near 0
                p.uniform_(-0.3, 0.3).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return unet


def save_pipeline(folder: Path, unet: UNet2DModel, variance_type: str = "fixed_large", **scheduler) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type, **scheduler)).save_pretrained(folder)
    return folder


def assert_same_output(ours, theirs: UNet2DModel, resolution: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, resolution, resolution, generator=gen), torch.tensor([3, 871])
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert expected.abs().mean() > 0.1, "outputs too small for the comparison to mean anything"
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("topology", [CIFAR10, SMALL_256_STYLE], ids=["cifar10-32", "256-style"])
def test_import_and_export_compute_what_diffusers_computes(tmp_path, topology):
    unet = randomised_unet(topology)
    folder = save_pipeline(tmp_path / "hub", unet)
    cfg = cd.import_diffusers(folder, tmp_path / "model.safetensors")
    assert cfg.model.attn_resolutions == (16,) and cfg.diffusion.model_var_type == "fixedlarge"
    ours, _ = load_model_file(tmp_path / "model.safetensors")
    assert_same_output(ours, unet, topology["sample_size"])

    cd.export_diffusers(tmp_path / "model.safetensors", tmp_path / "exported")
    reloaded = UNet2DModel.from_pretrained(tmp_path / "exported" / "unet").eval()
    assert_same_output(ours, reloaded, topology["sample_size"])
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "exported" / "scheduler")
    assert scheduler.config.variance_type == "fixed_large" and scheduler.config.clip_sample


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    """A small 256²-style UNet2DModel saved as a pipeline folder (fixed_large)."""
    unet = randomised_unet(SMALL_256_STYLE, seed=2)
    return unet, save_pipeline(tmp_path_factory.mktemp("small") / "hub", unet)



def float64_tables(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The same scheduler with its β/ᾱ tables in float64, as ours are."""
    c = scheduler.config
    scheduler.betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def scheduler_step(scheduler: DDPMScheduler, eps, t: int, x_t, seed: int) -> torch.Tensor:
    # step() draws its noise with randn_tensor(shape, generator), which is torch.randn on CPU.
    return scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample


@pytest.mark.parametrize("variance_type, prediction_type", [
    ("fixed_large", "epsilon"), ("fixed_small", "epsilon"), ("fixed_small", "sample")])
def test_one_reverse_step_equals_ddpm_scheduler_step(tmp_path, small_pipeline, variance_type, prediction_type):
    unet, _ = small_pipeline
    folder = save_pipeline(tmp_path / "hub", unet, variance_type, prediction_type=prediction_type)
    cd.import_diffusers(folder, tmp_path / "model.safetensors")
    ours, diffusion = load_model_file(tmp_path / "model.safetensors")
    theirs = DDPMScheduler.from_pretrained(folder / "scheduler")
    exact = float64_tables(DDPMScheduler.from_pretrained(folder / "scheduler"))
    for t in (999, 500, 1, 0):  # t = 0 adds no noise in both
        x_t = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(100 + t))
        with torch.no_grad():
            got = diffusion.p_sample(ours, x_t, torch.tensor([t]), noise=noise)
            eps = unet(x_t, t).sample
        assert (got - scheduler_step(exact, eps, t, x_t, 100 + t)).abs().max().item() <= 1e-5, t
        # With its own float32 tables diffusers differs by up to ~8e-5 at t = 1, where
        # β_1 = 1 - ᾱ_1/ᾱ_0 and 1 - ᾱ_1 cancel in float32.
        assert (got - scheduler_step(theirs, eps, t, x_t, 100 + t)).abs().max().item() <= 2e-4, t


def test_fixed_large_variance_at_t0_differs_but_sampling_does_not():
    """Ours takes σ²_0 = β̃_1 (the original code); diffusers takes β_0. Neither adds
    noise at t = 0, so samples agree; only our bits/dim decoder term uses σ_0."""
    from ddpm_dist.modelio.factory import build_diffusion
    ours = build_diffusion(cd.diffusion_config_from_scheduler({"variance_type": "fixed_large"}))
    theirs = float64_tables(DDPMScheduler(variance_type="fixed_large"))
    assert math.isclose(theirs._get_variance(0).item(), 1e-4, rel_tol=1e-9)
    assert math.isclose(ours.model_variance[0].item(), ours.posterior_variance[1].item())
    assert ours.model_variance[0].item() < 0.6e-4
    for t in (1, 500, 999):
        assert math.isclose(ours.model_variance[t].item(), theirs._get_variance(t).item(), rel_tol=1e-9)


def test_hub_layout_bin_with_legacy_attention_names(tmp_path, small_pipeline):
    """The hub's flat layout (config.json, diffusion_pytorch_model.bin, scheduler_config.json at
    the top) with diffusers' deprecated attention names (query, key, value, proj_attn)."""
    unet, folder = small_pipeline
    flat = tmp_path / "flat"
    flat.mkdir()
    tensors = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {re.sub(r"(\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.",
                      lambda m: f"{m.group(1)}{legacy[m.group(2)]}.", k): v for k, v in tensors.items()}
    assert any(".proj_attn." in k for k in renamed)
    torch.save(renamed, flat / "diffusion_pytorch_model.bin")
    for src, dst in (("unet/config.json", "config.json"), ("scheduler/scheduler_config.json", "scheduler_config.json")):
        (flat / dst).write_text((folder / src).read_text())
    cd.import_diffusers(flat, tmp_path / "model.pt")
    ours, _ = load_model_file(tmp_path / "model.pt")
    assert_same_output(ours, unet, 64)
    assert_same_output(ours, UNet2DModel.from_pretrained(flat).eval(), 64)  # diffusers reads it too


def test_a_key_that_does_not_fit_is_named(small_pipeline):
    _, folder = small_pipeline
    tensors = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    model_cfg = cd.model_config_from_unet(json.loads((folder / "unet" / "config.json").read_text()))
    cases = [({**tensors, "mid_block.attentions.1.to_q.weight": torch.zeros(1)},
              "unexpected key mid_block.attentions.1.to_q.weight"),
             ({**tensors, "conv_in.weight": torch.zeros(32, 3, 1, 1)},
              "key conv_in.weight has shape [32, 3, 1, 1], expected [32, 3, 3, 3]"),
             ({k: v for k, v in tensors.items() if k != "conv_out.bias"}, "missing key conv_out.bias")]
    for broken, message in cases:
        with pytest.raises(cd.ConversionError, match=re.escape(message)):
            cd.state_dict_from_diffusers(broken, model_cfg)


@pytest.mark.parametrize("unet_change, scheduler_change, named", [
    ({"downsample_padding": 1}, {}, "downsample_padding=1"),
    ({"flip_sin_to_cos": True}, {}, "flip_sin_to_cos=True"),
    ({"norm_eps": 1e-5}, {}, "norm_eps=1e-05"),
    ({"attention_head_dim": 8}, {}, "attention_head_dim=8"),
    ({"up_block_types": ["UpBlock2D"] * 6}, {}, "up_block_types="),
    ({"resnet_groups": 32}, {}, "setting 'resnet_groups'"),
    ({}, {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({}, {"beta_schedule": "scaled_linear"}, "beta_schedule='scaled_linear'"),
    ({}, {"clip_sample": False}, "clip_sample=False"),
    ({}, {"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
])
def test_an_unsupported_setting_is_named(small_pipeline, unet_change, scheduler_change, named):
    _, folder = small_pipeline
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    scheduler_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(cd.ConversionError, match=re.escape(named)):
        cd.model_config_from_unet({**unet_cfg, **unet_change})
        cd.diffusion_config_from_scheduler({**scheduler_cfg, **scheduler_change})


def test_defaults_for_omitted_keys_are_diffusers_defaults():
    for cls, table in ((UNet2DModel, cd.UNET_DEFAULTS), (DDPMScheduler, cd.SCHEDULER_DEFAULTS)):
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default
                    for k, p in params.items() if k != "self"}
        assert defaults == table, cls.__name__


def test_cli_converts_without_diffusers(tmp_path, small_pipeline):
    """The library reads JSON and tensors only: import and export run with diffusers blocked."""
    unet, folder = small_pipeline
    blocked = ("import runpy, sys; sys.modules['diffusers'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    tool = str(ROOT / "tools" / "convert_diffusers.py")
    model, exported = tmp_path / "model.safetensors", tmp_path / "exported"
    for args in (["import", str(folder), "--out", str(model)], ["export", str(model), "--out", str(exported)]):
        proc = subprocess.run([sys.executable, "-c", blocked, tool, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    reloaded = DDPMPipeline.from_pretrained(exported).unet.eval()
    assert_same_output(lambda x, t: reloaded(x, t).sample, unet, 64)
    proc = subprocess.run([sys.executable, tool, "import", str(tmp_path), "--out", str(model)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert "error: " in proc.stderr and "no config.json" in proc.stderr


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_beta_schedules_map_to_the_same_betas(beta_schedule):
    from ddpm_dist.diffusion import make_beta_schedule
    cfg = cd.diffusion_config_from_scheduler({"beta_schedule": beta_schedule})
    theirs = DDPMScheduler(beta_schedule=beta_schedule).betas.double()  # float32 in diffusers
    assert (make_beta_schedule(cfg.schedule, cfg.num_timesteps) - theirs).abs().max() < 1e-7
    assert cd.scheduler_config(cfg)["beta_schedule"] == beta_schedule
