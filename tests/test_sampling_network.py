"""How the sampler runs the network (ddpm_dist/samplers.py: `network_plan`, `SamplingNetwork`):
the float32 CPU path is the plain model call bit for bit, the GPU path's bf16 weight copy and
channels_last x_t (run here on the CPU with the GPU's plan), one graph without breaks, and one
compile for all steps."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from ddpm_dist import samplers
from ddpm_dist.config import DiffusionConfig, ModelConfig
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.noise import SampleNoise
from ddpm_dist.samplers import NetworkPlan, Sampler, SamplingNetwork, ddim_sample_loop, network_plan, respace

SHAPE = (3, 8, 8)
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
# The GPU's plan with bf16, except compile (Inductor on the CPU is slow and not what is tested).
GPU_BF16 = NetworkPlan(dtype=torch.bfloat16, autocast=False, memory_format=torch.channels_last, compile=False)


@pytest.fixture(scope="module")
def model_and_diffusion():
    """A tiny U-Net whose weights are all random (zero-initialised layers too)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                                    resolution=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, build_diffusion(DiffusionConfig(num_timesteps=40))


def test_the_plan_is_bf16_weights_channels_last_and_compiled_on_cuda_and_as_before_on_a_cpu():
    assert network_plan(CUDA, bf16=True) == NetworkPlan(torch.bfloat16, False, torch.channels_last, True, True)
    assert network_plan(CUDA, bf16=False).dtype == torch.float32
    assert network_plan(CPU, bf16=True) == NetworkPlan(torch.float32, True, torch.preserve_format, False)
    assert network_plan(CPU, bf16=False) == NetworkPlan(torch.float32, False, torch.preserve_format, False)
    assert not network_plan(CUDA, True, "false").compile and network_plan(CPU, False, "true").compile
    assert not network_plan(CUDA, True, "false").cuda_graphs and not network_plan(CPU, False, "true").cuda_graphs


@pytest.mark.parametrize("kind,steps,bf16", [("ddpm", None, False), ("ddim", 8, False), ("ddim", 8, True)])
def test_the_cpu_sampler_is_the_plain_model_call_bit_for_bit(model_and_diffusion, kind, steps, bf16):
    """The CPU path before bf16 copies, channels_last and compile: respace, map the timesteps,
    call the model (under bf16 autocast with bf16), float32 arithmetic."""
    model, diffusion = model_and_diffusion
    spaced, kept = respace(diffusion, steps)
    kept = torch.as_tensor(kept)

    def plain(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x, kept[t] if steps else t)
    shape, noise = (3, *SHAPE), lambda: SampleNoise(5, [4, 0, 9])
    if kind == "ddpm":
        before = spaced.p_sample_loop(plain, shape, generator=noise())
    else:
        before = ddim_sample_loop(spaced, plain, shape, eta=1.0, generator=noise())
    now = Sampler(model, diffusion, SHAPE, sampler=kind, steps=steps, eta=1.0, bf16=bf16)(noise(), "cpu")
    assert torch.equal(now, before)


def test_the_bf16_copy_runs_in_bf16_and_leaves_the_callers_float32_model_alone(model_and_diffusion):
    model, _ = model_and_diffusion
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    network = SamplingNetwork(model, GPU_BF16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.bfloat16 for p in network.parameters())
    assert network.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = {}
    for name in ("temb", "conv_in", "norm_out", "conv_out"):  # activations, not autocast's float32 norms
        getattr(network.net, name).register_forward_hook(lambda m, i, o, name=name: dtypes.update({name: o.dtype}))
    x, t = torch.randn(4, *SHAPE), torch.tensor([0, 7, 20, 39])
    out = network(x, t)
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, t), rtol=0, atol=0.05 * model(x, t).abs().max().item())


def test_on_the_gpu_path_every_x_t_is_float32_and_channels_last(model_and_diffusion, monkeypatch):
    model, diffusion = model_and_diffusion
    monkeypatch.setattr(samplers, "network_plan", lambda device, bf16, compile: GPU_BF16)
    for kind in ("ddpm", "ddim"):
        sampler = Sampler(model, diffusion, SHAPE, sampler=kind, steps=4, eta=1.0, bf16=True)
        seen = []
        sampler.network.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        out = sampler(SampleNoise(1, range(3)), "cpu")
        assert len(seen) == 4 and all(x.dtype == torch.float32 for x in seen)
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
        assert out.dtype == torch.float32 and out.abs().max() <= 1  # the last step clips x̂_0, σ = 0


@pytest.mark.parametrize("plan", ["cpu", "cpu bf16", "gpu bf16"])
def test_the_samplers_network_call_traces_as_one_graph_without_breaks(model_and_diffusion, plan):
    """What --compile compiles: the cast of x_t, the U-Net forward and the cast back."""
    model, diffusion = model_and_diffusion
    if plan == "gpu bf16":
        network = SamplingNetwork(model, GPU_BF16)
    else:
        network = Sampler(model, diffusion, SHAPE, bf16=plan == "cpu bf16", compile="false").network
    torch._dynamo.reset()
    explained = torch._dynamo.explain(network)(torch.randn(2, *SHAPE), torch.tensor([0, 39]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compile_is_done_once_for_every_step_and_batch_and_changes_nothing_eager(model_and_diffusion,
                                                                               monkeypatch):
    """torch.compile with a backend that counts graphs and runs them eagerly."""
    model, diffusion = model_and_diffusion
    counter, compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    sampler = Sampler(model, diffusion, SHAPE, sampler="ddim", steps=5, compile="true")
    eager = Sampler(model, diffusion, SHAPE, sampler="ddim", steps=5, compile="false")
    for seed in (0, 1):
        noise = lambda: SampleNoise(seed, range(3))
        assert torch.equal(sampler(noise(), "cpu"), eager(noise(), "cpu"))
    assert counter.frame_count == 1  # 10 network calls, one graph
    assert isinstance(sampler.network, SamplingNetwork) and sampler.plan == dataclasses.replace(eager.plan,
                                                                                                compile=True)


def test_fid_sample_compile_flag_compiles_once_and_writes_the_eager_samples(model_and_diffusion, tmp_path,
                                                                          monkeypatch):
    from ddpm_dist.cli.fid_sample import main, parse_args
    from ddpm_dist.config import Config
    from ddpm_dist.modelio.model_file import save_model_file
    model, _ = model_and_diffusion
    cfg = Config(model=ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                                   resolution=8), diffusion=DiffusionConfig(num_timesteps=40))
    save_model_file(tmp_path / "tiny.safetensors", model.state_dict(), cfg)
    counter, compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    results = {}
    for setting in ("true", "auto"):  # auto is off on a CPU
        out = tmp_path / setting
        argv = ["--ckpt", tmp_path / "tiny.safetensors", "--num-samples", 3, "--out", out, "--steps", 3,
                "--batch-size", 2, "--device", "cpu", "--compile", setting]
        assert main([str(a) for a in argv]) == 0
        results[setting] = {p.name: p.read_bytes() for p in sorted(out.glob("[0-9]*/[0-9]*.png"))}  # not the grid
        assert json.loads((out / "result.json").read_text())["runs"][0]["compiled"] == (setting == "true")
    assert results["true"] == results["auto"] and len(results["true"]) == 3
    assert counter.frame_count == 1  # 2 batches (the last one padded) × 3 steps, one graph
    with pytest.raises(SystemExit):
        parse_args(["--random-init", "--num-samples", "2", "--out", str(tmp_path), "--compile", "yes"])


def test_the_cuda_graph_step_is_one_graph_for_every_step_and_gives_the_eager_samples(model_and_diffusion,
                                                                                   monkeypatch):
    """The GPU plan's compile, mode="reduce-overhead": the network call at the run's fixed batch,
    captured in a CUDA graph once and replayed at every step. Here on the CPU's float32 plan, with
    a backend that records the mode it is asked for and runs the graph as traced (a CPU has no
    CUDA graphs): the sampler's code is that of the GPU, its samples the eager ones bit for bit."""
    model, diffusion = model_and_diffusion
    counter, modes, compile = CompileCounter(), [], torch.compile

    def backend(gm, example_inputs, **options):
        modes.append(options.get("mode"))
        return counter(gm, example_inputs)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=backend, **kw))
    graphed = dataclasses.replace(network_plan(CPU, bf16=False, compile="true"), cuda_graphs=True)
    monkeypatch.setattr(samplers, "network_plan", lambda device, bf16, compile:
                        graphed if compile == "true" else network_plan(device, bf16, compile))
    torch._dynamo.reset()
    for kind, steps in (("ddpm", None), ("ddim", 6)):
        captured = Sampler(model, diffusion, SHAPE, sampler=kind, steps=steps, eta=1.0, compile="true")
        eager = Sampler(model, diffusion, SHAPE, sampler=kind, steps=steps, eta=1.0, compile="false")
        for seed in (0, 1):
            assert torch.equal(captured(SampleNoise(seed, range(3)), "cpu"), eager(SampleNoise(seed, range(3)), "cpu"))
    assert counter.frame_count == 1 and modes == ["reduce-overhead"]  # 40 + 6 steps × 2 batches, one graph
