"""Engines with real processes: 2 gloo ranks on half the batch each must train exactly like one
process on the whole batch (DDP, FSDP2, DeepSpeed), with and without gradient accumulation;
EMA stays shard-local under FSDP2; a 2-rank DCP checkpoint loads on 1 rank; fp16 overflow
skips the step on every rank."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ddpm_dist.config import Config, DiffusionConfig, ModelConfig
from ddpm_dist.distributed import free_port, init_distributed, teardown
from ddpm_dist.modelio.factory import build_diffusion
from ddpm_dist.training.engines import build_engine
from ddpm_dist.training.step import train_step
from ddpm_dist.unet import UNet

SMALL = ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                    dropout=0.0)
STEPS, GLOBAL_BATCH, LR = 3, 8, 1e-3


def make_cfg(engine: str, precision: str = "fp32", accum: int = 1, world: int = 1, **train) -> Config:
    cfg = Config(model=SMALL, engine=engine)
    cfg.train.batch_size = GLOBAL_BATCH
    cfg.train.micro_batch_size = GLOBAL_BATCH // (world * accum)
    cfg.train.precision, cfg.train.ema_decay = precision, 0.9
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def batches():
    """The same global batches in every process: (x, t, noise) per step."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g),
             torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)) for _ in range(STEPS)]


def new_engine(cfg: Config, info):
    torch.manual_seed(0)  # identical initial weights on every rank
    return build_engine(cfg, UNet(**vars(cfg.model)), torch.device("cpu"), info)


def train(engine, rank: int, world: int, accum: int) -> list:
    """Each rank takes its contiguous share of the global batch, split into `accum` micro-batches,
    through the training step train.py runs."""
    diffusion = build_diffusion(DiffusionConfig())
    results = []
    for x, t, noise in batches():
        parts = [a.chunk(world)[rank].chunk(accum) for a in (x, t, noise)]
        results.append(train_step(engine, diffusion, list(zip(*parts)), LR).result)
    return results


def reference(accum: int = 1) -> tuple[dict, dict, list]:
    """One process, whole batch: the answer every distributed engine must give."""
    info = init_distributed("cpu")
    engine = new_engine(make_cfg("single", accum=accum), info)
    results = train(engine, 0, 1, accum)
    return ({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            engine.full_ema_state_dict(), results)


def full_model_state(engine) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_ds_model_state(engine) -> dict:
    import deepspeed
    with deepspeed.zero.GatheredParameters(engine.params):  # a no-op below ZeRO-3
        return {n: p.detach().cpu().clone() for n, p in zip(engine.names, engine.params)}


def _dist_worker(rank: int, port: int, engine_name: str, out_dir: str, train_kw: dict) -> None:
    """Train with 1 and with 2 micro-batches per step (one spawn: start-up is the slow part)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        for accum in (1, 2):
            engine = new_engine(make_cfg(engine_name, accum=accum, world=2, **train_kw), info)
            results = train(engine, rank, 2, accum)
            model = full_model_state(engine) if engine_name != "deepspeed" else full_ds_model_state(engine)
            out = {"model": model, "ema": engine.full_ema_state_dict(), "results": results}
            if engine_name == "fsdp" and accum == 2:
                out.update(fsdp_checks(engine, out_dir))
            if rank == 0:
                torch.save(out, os.path.join(out_dir, f"result{accum}.pt"))
    finally:
        teardown()


def fsdp_checks(engine, out_dir: str) -> dict:
    """EMA is held as shards; the checkpoint goes to disk through DCP; the sample forward with
    EMA weights equals the EMA model's output."""
    from torch.distributed.tensor import DTensor
    ema = engine.ema.state_dict()
    shard = ema["conv_in.weight"]
    assert isinstance(shard, DTensor) and shard.to_local().shape[0] == shard.shape[0] // 2
    engine.save(Path(out_dir) / "ckpt")
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([5, 500])
    with torch.no_grad(), engine.ema_weights():
        ema_out = engine.model(x, t)
    assert engine.module.training, "train mode is restored after sampling"
    return {"ema_out": ema_out, "probe": (x, t)}


def run_two_ranks(tmp_path, engine_name: str, **train_kw) -> dict:
    mp.spawn(_dist_worker, args=(free_port(), engine_name, str(tmp_path), train_kw), nprocs=2, join=True)
    return {accum: torch.load(tmp_path / f"result{accum}.pt", weights_only=False) for accum in (1, 2)}


def assert_same(got: dict, want: dict, what: str, exact: bool = False) -> None:
    # Adam divides by sqrt(v): reduction-order noise in tiny gradients becomes ~1e-5 in the
    # weights. A real mismatch (a lost micro-batch, an unsynced rank) moves them by ~LR.
    assert got.keys() == want.keys(), what
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-3, "atol": 1e-4}
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m: f"{what} {k}: {m}")


def assert_matches_reference(got: dict) -> None:
    for accum in (1, 2):
        model, ema, results = reference(accum)
        assert_same(got[accum]["model"], model, f"accum={accum} model")
        assert_same(got[accum]["ema"], ema, f"accum={accum} ema")
        for a, b in zip(got[accum]["results"], results):
            assert not a.skipped and float(a.grad_norm) == pytest.approx(float(b.grad_norm), rel=1e-4)


def test_tolerance_catches_a_lost_half_batch():
    # The control for assert_same: training on rank 0's half alone (what an unsynced rank
    # does) must fail the comparison with the full-batch reference.
    model, _, _ = reference()
    engine = new_engine(make_cfg("single"), init_distributed("cpu"))
    train(engine, 0, 2, 1)
    with pytest.raises(AssertionError):
        assert_same(dict(engine.module.state_dict()), model, "half batch")


def test_ddp_matches_single_process(tmp_path):
    assert_matches_reference(run_two_ranks(tmp_path, "ddp"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # 1-process load
def test_fsdp_matches_single_process_and_reshards_to_one_rank(tmp_path):
    got = run_two_ranks(tmp_path, "fsdp")
    assert_matches_reference(got)
    # Load the 2-rank checkpoint into a 1-process engine: same weights, EMA and EMA outputs.
    model, ema = got[2]["model"], got[2]["ema"]
    engine = new_engine(make_cfg("single"), init_distributed("cpu"))
    engine.load(tmp_path / "ckpt")
    assert_same(dict(engine.module.state_dict()), model, "loaded model", exact=True)
    assert_same(engine.full_ema_state_dict(), ema, "loaded ema", exact=True)
    assert engine.optimizer.state, "Adam moments come back too"
    with torch.no_grad(), engine.ema_weights():
        torch.testing.assert_close(engine.model(*got[2]["probe"]), got[2]["ema_out"], rtol=1e-4, atol=1e-5)


def _low_precision_worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        engine = new_engine(make_cfg("fsdp", "bf16", world=2, activation_checkpointing=True), info)
        assert all(not r.skipped and math.isfinite(float(r.grad_norm)) for r in train(engine, rank, 2, 1))
        # fp16: an overflow in rank 0's shard alone must stop the step on both ranks.
        engine = new_engine(make_cfg("fsdp", "fp16", world=2), info)
        x, t, noise = (a.chunk(2)[rank] for a in batches()[0])
        engine.backward(F.mse_loss(engine.model(x, t).float(), noise))
        before = full_model_state(engine)
        if rank == 0:
            engine.params[3].grad.to_local()[0] = float("inf")
        assert engine.step(LR).skipped and engine.scaler.scale == 2.0 ** 15
        after = full_model_state(engine)
        assert all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        teardown()


def test_fsdp_bf16_with_checkpointing_and_fp16_overflow_on_one_rank():
    mp.spawn(_low_precision_worker, args=(free_port(),), nprocs=2, join=True)


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_zero_matches_single_process(tmp_path, stage):
    import deepspeed  # noqa: F401  (the test extras install it; missing must fail, not skip)
    assert_matches_reference(run_two_ranks(tmp_path, "deepspeed", zero_stage=stage))


def _ds_native_worker(rank: int, port: int, ckpt_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        cfg = make_cfg("deepspeed", "bf16", world=2, zero_stage=3)
        engine = new_engine(cfg, info)
        assert all(not r.skipped and math.isfinite(float(r.grad_norm)) for r in train(engine, rank, 2, 1))
        engine.save(Path(ckpt_dir))
        x, t, _ = (a.chunk(2)[rank] for a in batches()[0])
        outputs = []
        for e in (engine, new_engine(cfg, info)):
            if e is not engine:
                e.load(Path(ckpt_dir))
            with torch.no_grad(), e.ema_weights(), e.autocast():
                outputs.append(e.model(x, t))
        assert torch.equal(*outputs), "EMA partitions and weights come back exactly"
    finally:
        teardown()


@pytest.mark.slow  # ~30-55 s: two ZeRO-3 initialisations
def test_deepspeed_zero3_bf16_native_checkpoint_round_trip(tmp_path):
    import deepspeed  # noqa: F401  (the test extras install it; missing must fail, not skip)
    mp.spawn(_ds_native_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)


def test_deepspeed_fp16_follows_what_the_accelerator_supports(tmp_path):
    # DeepSpeed's CPU accelerator supports fp16 on some CPUs (avx512_fp16) and not on others:
    # refused in one line exactly where it says unsupported, trained where it says supported.
    import deepspeed  # noqa: F401  (the test extras install it; missing must fail, not skip)
    from deepspeed.accelerator import get_accelerator

    from ddpm_dist.training.engines import EngineSettings
    from ddpm_dist.training.engines.deepspeed_engine import check_supported
    if not get_accelerator().is_fp16_supported():
        with pytest.raises(RuntimeError, match="precision=fp16 is not supported"):
            check_supported(EngineSettings.of(make_cfg("deepspeed", "fp16")))
        return
    got = run_two_ranks(tmp_path, "deepspeed", precision="fp16")
    for accum in (1, 2):
        assert all(torch.isfinite(v).all() for v in got[accum]["model"].values())


def test_ema_closed_form_through_engine():
    # With lr=0 the weights stay w0 and grads are clipped away: the EMA stays exactly w0;
    # then a constant jump of the weights follows c*(1-decay^k) like tests/test_ema.py.
    engine = new_engine(make_cfg("single"), init_distributed("cpu"))
    w0 = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with torch.no_grad():
        for p in engine.params:
            p.add_(1.0)
    for k in range(1, 4):
        for p in engine.params:
            p.grad = torch.zeros_like(p)
        assert not engine.step(0.0).skipped
        ema = engine.full_ema_state_dict()
        for name, w in w0.items():
            torch.testing.assert_close(ema[name], w + (1 - 0.9 ** k), rtol=0, atol=1e-6)


def test_activation_checkpointing_gives_the_same_step():
    plain = new_engine(make_cfg("single"), init_distributed("cpu"))
    ckpt = new_engine(make_cfg("single", activation_checkpointing=True), init_distributed("cpu"))
    calls = []  # a checkpointed block runs its ResBlock twice: forward, then recompute
    res = ckpt.module.blocks()[0].res
    res.forward = lambda *a, forward=res.forward: calls.append(1) or forward(*a)
    train(plain, 0, 1, 1)
    train(ckpt, 0, 1, 1)
    assert len(calls) == 2 * STEPS
    assert_same(dict(ckpt.module.state_dict()), dict(plain.module.state_dict()), "checkpointed", exact=True)


def test_deepspeed_missing_is_one_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # how Python marks "not importable"
    from ddpm_dist.training.engines.deepspeed_engine import import_deepspeed
    with pytest.raises(RuntimeError, match=r"pip install ddpm-dist\[deepspeed\]"):
        import_deepspeed()


def test_compile_on_cpu_low_precision_forces_avx2():
    import torch._inductor.config as inductor_config
    from ddpm_dist.runtime import guard_cpu_compile
    old = inductor_config.cpp.simdlen
    try:
        guard_cpu_compile(torch.device("cpu"), "fp32")
        assert inductor_config.cpp.simdlen == old
        with pytest.warns(UserWarning, match="AVX2"):
            guard_cpu_compile(torch.device("cpu"), "bf16")
        assert inductor_config.cpp.simdlen == 256
    finally:
        inductor_config.cpp.simdlen = old


def test_fp16_overflow_skips_the_step_and_backs_off():
    engine = new_engine(make_cfg("single", precision="fp16"), init_distributed("cpu"))
    x, t, noise = batches()[0]
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    ema_before = engine.full_ema_state_dict()
    with engine.autocast():
        out = engine.model(x, t)
    engine.backward(F.mse_loss(out.float(), noise))
    engine.params[3].grad[0] = float("inf")
    result = engine.step(LR)
    assert result.skipped and not torch.isfinite(result.grad_norm)
    assert engine.scaler.scale == 2.0 ** 15 and engine.scaler.state_dict()["growth_tracker"] == 0
    assert all(torch.equal(v, before[k]) for k, v in engine.module.state_dict().items())
    assert all(torch.equal(v, ema_before[k]) for k, v in engine.full_ema_state_dict().items())
    assert all(p.grad is None for p in engine.params)
    with engine.autocast():
        out = engine.model(x, t)
    engine.backward(F.mse_loss(out.float(), noise))
    result = engine.step(LR)
    assert not result.skipped and engine.scaler.state_dict()["growth_tracker"] == 1


def test_unet_training_and_sampling_trace_without_graph_breaks():
    # torch.compile(mode="reduce-overhead") and whole-model compile need one graph: a break
    # splits the step and re-enters Python on every call. Traced on CPU (no code generated).
    import torch._dynamo

    from ddpm_dist.training.engines.base import apply_block_options
    diffusion = build_diffusion(DiffusionConfig())
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([0, 999])
    for checkpointing in (False, True):
        model = UNet(**vars(SMALL))
        apply_block_options(model, activation_checkpointing=checkpointing, compile=False,
                            device=torch.device("cpu"), precision="fp32")
        for name, fn in (("training loss", lambda: diffusion.training_losses(model, x, t, noise)),
                         ("reverse step", lambda: diffusion.p_sample(model, x, t, noise=noise))):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(fn)()
            assert explained.graph_break_count == 0, f"{name}: {explained.break_reasons}"
            assert explained.graph_count == 1, name


def test_compile_auto_is_on_for_cuda_only():
    from ddpm_dist.runtime import compile_enabled
    assert compile_enabled("auto", torch.device("cuda", 0)) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("true", torch.device("cpu")) and not compile_enabled("false", torch.device("cuda", 0))


def test_every_registered_engine_has_a_class_writing_the_format_the_registry_names():
    # The registry is what config validation, resume and model loading read: it must match the classes.
    from ddpm_dist.config import CHOICES
    from ddpm_dist.engine_registry import ENGINES
    from ddpm_dist.training.engines import engine_class
    assert CHOICES["engine"] == tuple(ENGINES)
    for name, spec in ENGINES.items():
        assert engine_class(name).checkpoint_format == spec.checkpoint_format, name


def test_deepspeed_runs_torchs_fused_adam_on_cuda_and_foreach_on_cpu():
    from ddpm_dist.training.engines import EngineSettings
    from ddpm_dist.training.engines.deepspeed_engine import ds_config
    cfg = EngineSettings.of(make_cfg("deepspeed"))
    cuda = ds_config(cfg, 4, 1, torch.device("cuda", 0))["optimizer"]["params"]
    cpu = ds_config(cfg, 4, 1, torch.device("cpu"))["optimizer"]["params"]
    assert cuda["torch_adam"] and cuda["fused"] and "foreach" not in cuda
    assert cpu["torch_adam"] and cpu["foreach"] and "fused" not in cpu


def test_cudnn_benchmark_is_on_for_cuda_only_and_mfu_is_of_the_measured_h200_peak(monkeypatch):
    """build_engine and Sampler call enable_cudnn_benchmark: a run's shapes are fixed, so cuDNN's one-off
    algorithm timing pays back (on CUDA only)."""
    from ddpm_dist.runtime import enable_cudnn_benchmark
    from ddpm_dist.training.telemetry import peak_flops
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    enable_cudnn_benchmark(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark
    enable_cudnn_benchmark(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0)) == 790e12  # measured dense bf16, not the data sheet's 989
