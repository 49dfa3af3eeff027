"""Training: Algorithm 1 of Ho et al. (2020), with the distributed machinery beside it.

    python -m ddpm_dist.train --config configs/demo_digits.yaml [key.sub=value ...]
    torchrun --nproc_per_node=8 -m ddpm_dist.train --config configs/cifar10.yaml engine=fsdp

Resumes by itself from the newest complete checkpoint in `<out_dir>/checkpoints/`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_dist import distributed
from ddpm_dist.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ddpm_dist.config import Config, ConfigError, load_config, save_config
from ddpm_dist.data import build_stream
from ddpm_dist.data.fs import DataError
from ddpm_dist.training.engines import batch_split, build_engine
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.images import make_grid, save_png, to_uint8
from ddpm_dist.utils.logs import MetricsWriter, log, setup_logging
from ddpm_dist.training.telemetry import StepTimer, loss_by_quarter, memory_gb, model_flops_per_image, peak_flops

MAX_NONFINITE = 20  # consecutive non-finite steps before the run stops with a checkpoint


class NonFiniteLossError(RuntimeError):
    pass


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct seed per (seed, step, rank): the random state of a step is a function of its
    number, so a resumed run draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step) * 4_099 + rank


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up over optim.warmup_steps, then constant (the paper's schedule)."""
    return cfg.optim.lr * min(1.0, (step + 1) / max(1, cfg.optim.warmup_steps))


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (Slurm preemption or time limit); acted on at a step boundary
    after all ranks agree, never inside the handler."""
    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    last_loss: float
    signum: int | None = None  # the signal this rank received, if any: launchers decide on requeue by it


def sample_grid(cfg: Config, engine, diffusion, device, step: int, writer: MetricsWriter) -> None:
    """EMA samples from a fixed seed; every rank computes (sharded models need all of them),
    rank 0 writes the grid."""
    shape = (cfg.train.num_samples, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    with engine.ema_weights(), engine.autocast():
        x = diffusion.p_sample_loop(engine.model, shape, generator=gen, device=device, progress=writer.enabled)
    grid = make_grid(to_uint8(x).cpu())
    writer.image(step, "samples/ema", grid)
    if writer.enabled:
        (Path(cfg.out_dir) / "samples").mkdir(exist_ok=True)
        save_png(grid, Path(cfg.out_dir) / "samples" / f"step_{step:08d}.png")


def train(cfg: Config) -> TrainResult:
    # Catch stop signals from the start: one arriving while the model is built is acted on at
    # the first step boundary instead of killing the process unsaved.
    stop = StopRequest()
    stop.install()
    try:
        info = distributed.init_distributed(cfg.device, always_group=cfg.engine != "single")
        setup_logging(info.rank)
        return _train(cfg, info, stop)
    finally:
        stop.uninstall()
        distributed.teardown()


def _train(cfg: Config, info, stop: StopRequest) -> TrainResult:
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    micro_batch, accum = batch_split(cfg, info.world_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    flops = model_flops_per_image(model, cfg.model)
    diffusion = build_diffusion(cfg.diffusion)
    engine = build_engine(cfg, model, info.device, info)
    stream = build_stream(cfg, micro_batch, rank=info.rank, world_size=info.world_size)

    start = 0
    resume_from = latest_checkpoint(ckpt_dir)
    if resume_from is not None:
        extra = load_checkpoint(resume_from, engine, cfg)
        start = extra["step"]
        stream.load_state_dict(extra["data"])
        log.info(f"resumed from {resume_from} at step {start}")
    log.info(f"{cfg.engine} on {info.world_size} x {info.device.type}: global batch {cfg.train.batch_size} = "
             f"{info.world_size} ranks x {accum} micro-batches x {micro_batch}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
             f"parameters; steps {start} → {cfg.train.total_steps}; output {out_dir}")

    writer = MetricsWriter(out_dir, enabled=info.is_main)
    batches = iter(stream)
    # The engine keeps CUDA weights channels_last (faster convolutions); inputs match them.
    memory_format = torch.channels_last if info.device.type == "cuda" else torch.preserve_format
    timer = StepTimer()
    nonfinite, loss_value, step = 0, float("nan"), start
    progress = _progress(info.is_main, start, cfg.train.total_steps)
    try:
        for step in range(start, cfg.train.total_steps):
            torch.manual_seed(step_seed(cfg.seed, step, info.rank))  # dropout
            gen = torch.Generator(info.device).manual_seed(step_seed(cfg.seed, step, info.rank))
            losses, ts = [], []
            for micro in range(accum):
                # Algorithm 1: x_0 ~ q(x_0), t ~ Uniform({1..T}), ε ~ N(0, I); gradient step on
                # ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (t is 0-based here).
                x0 = next(batches).to(info.device, non_blocking=True, memory_format=memory_format)
                t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=gen, device=info.device)
                noise = torch.randn(x0.shape, generator=gen, device=info.device)
                last = micro == accum - 1
                with contextlib.nullcontext() if last else engine.no_sync():
                    with engine.autocast():
                        per_example = diffusion.training_losses(engine.model, x0, t, noise)
                    engine.backward(per_example.mean() / accum, sync=last)
                losses.append(per_example.detach())
                ts.append(t)
            result = engine.step(learning_rate(cfg, step))
            per_example, ts = torch.cat(losses), torch.cat(ts)
            loss_value = distributed.all_reduce_mean(per_example.mean()).item()
            nonfinite = nonfinite + 1 if (result.skipped or not math.isfinite(loss_value)) else 0
            timer.tick(cfg.train.batch_size)
            done = step + 1
            progress.update(1)
            if done % cfg.train.log_every == 0 or done == cfg.train.total_steps:
                scalars = {"loss": loss_value, "grad_norm": result.grad_norm, "lr": learning_rate(cfg, step),
                           "skipped_steps": float(result.skipped), **loss_by_quarter(per_example, ts, diffusion.num_timesteps),
                           **timer.rates(info.world_size, flops, peak_flops(info.device)), **memory_gb(info.device),
                           "data/skipped_samples": float(getattr(stream, "skipped", 0))}
                writer.scalars(done, scalars)
                progress.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{scalars['perf/images_per_s']:.0f}")
            if nonfinite >= MAX_NONFINITE:
                save_checkpoint(ckpt_dir, done, engine, {"data": stream.state_dict()}, cfg.train.keep_last, cfg)
                raise NonFiniteLossError(f"{nonfinite} non-finite steps in a row at step {done}; saved a checkpoint. "
                                         f"Lower optim.lr or use train.precision=bf16/fp32")
            if done % cfg.train.sample_every == 0 or done == cfg.train.total_steps:
                sample_grid(cfg, engine, diffusion, info.device, done, writer)
            stop_now = distributed.any_flag(stop.signum is not None)
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.total_steps or stop_now:
                save_checkpoint(ckpt_dir, done, engine, {"data": stream.state_dict()}, cfg.train.keep_last, cfg)
            if stop_now:
                log.info(f"stop requested (signal {stop.signum}): checkpoint at step {done} written, exiting")
                return TrainResult(done, True, loss_value, stop.signum)
        return TrainResult(cfg.train.total_steps, False, loss_value)
    finally:
        progress.close()
        writer.close()


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020).")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/cifar10.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. train.total_steps=1000")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except (ConfigError, CheckpointError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 3 if result.stopped_early else 0


if __name__ == "__main__":
    sys.exit(main())
