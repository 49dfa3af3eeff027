"""One optimizer step of Algorithm 1 (Ho et al. 2020): the code path that `ddpm_dist.train`,
the engine tests and `bench/train_throughput.py` all run.

    x_0 ~ q(x_0), t ~ Uniform({1, ..., T}), ε ~ N(0, I)            (`draw_micro_batches`)
    gradient step on ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖²          (`train_step`)

t is 0-based here. A global batch is split into micro-batches per rank; gradients of all but
the last are accumulated without synchronising, and the engine's `step` clips, runs Adam and
updates the EMA.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ddpm_dist.data.batch import ImageBatch, to_model_input
from ddpm_dist.diffusion import GaussianDiffusion
from ddpm_dist.training.engines import Engine, StepResult
from ddpm_dist.utils.seeds import Purpose, derive_seed

MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x_0, t, ε)


@dataclass(frozen=True)
class StepOutput:
    losses: torch.Tensor  # this rank's per-example losses, detached, in micro-batch order
    t: torch.Tensor       # their timesteps
    result: StepResult    # grad norm and whether the update was skipped


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed the step's random state from (seed, step, rank), so a resumed run draws exactly what
    an uninterrupted one would: torch's global generator for dropout, and the returned
    generator for t and ε (distinct streams)."""
    torch.manual_seed(derive_seed(seed, step, rank, Purpose.DROPOUT))
    return torch.Generator(device).manual_seed(derive_seed(seed, step, rank, Purpose.DIFFUSION))


def draw_micro_batches(batches: Iterator[ImageBatch], count: int, num_timesteps: int,
                       generator: torch.Generator, engine: Engine) -> list[MicroBatch]:
    """`count` micro-batches of (x_0 from the data, t, ε), on the engine's device and layout."""
    out = []
    for _ in range(count):
        x0 = to_model_input(next(batches), engine.device, engine.memory_format)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=engine.device)
        noise = torch.randn(x0.shape, generator=generator, device=engine.device)
        out.append((x0, t, noise))
    return out


def train_step(engine: Engine, diffusion: GaussianDiffusion, micro_batches: Sequence[MicroBatch],
               lr: float) -> StepOutput:
    """L_simple over the micro-batches, one optimizer step at `lr`."""
    n = len(micro_batches)
    losses, ts = [], []
    for i, (x0, t, noise) in enumerate(micro_batches):
        last = i == n - 1
        # DDP decides at forward time whether backward reduces: no_sync wraps both.
        with contextlib.nullcontext() if last else engine.no_sync():
            with engine.autocast():
                per_example = diffusion.training_losses(engine.model, x0, t, noise)
            engine.backward(per_example.mean() / n, sync=last)
        losses.append(per_example.detach())
        ts.append(t)
    result = engine.step(lr)
    return StepOutput(torch.cat(losses), torch.cat(ts), result)
