"""Per-block torch.compile (engine=fsdp, where FSDP2's hooks sit between the blocks): every U-Net
block compiles once for its own input shape and runs compiled on every call, also when the
blocks' distinct shapes outnumber Dynamo's per-function recompile limit (12 at 32², 19 at 256²,
limit 8), where the blocks past the limit used to run eager without a word.

Traced on the CPU with a backend that counts the graphs Dynamo hands it and their calls, and
runs them as traced (no code is generated). The layouts are the real CIFAR-10 and 256² configs
at width ch=32 instead of 128: which blocks share a shape depends on ch_mult, num_res_blocks,
the attention resolutions and the resolution, not on the width, and ch=32 keeps the 256² trace
cheap on a CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo

from ddpm_dist.config import load_config
from ddpm_dist.distributed import init_distributed, teardown
from ddpm_dist.training.engines import build_engine
from ddpm_dist.unet import UNet

ROOT = Path(__file__).resolve().parents[1]


class GraphCounter:
    """A torch.compile backend that counts graphs and calls of them, and runs each as traced."""

    def __init__(self):
        self.graphs, self.calls = 0, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


def block_signature(block, x: torch.Tensor) -> tuple:
    """What a compiled graph of a block is specialised on: its input's shape and its weights' shapes."""
    return tuple(x.shape), tuple(tuple(p.shape) for p in block.parameters())


@pytest.fixture
def one_rank_group():
    """engine=fsdp needs a process group, also with one rank."""
    info = init_distributed("cpu", always_group=True)
    yield info
    teardown()
    torch._dynamo.reset()


@pytest.mark.parametrize("layout,distinct,options", [("cifar10", 12, []),
                                                     pytest.param("celebahq", 19, [], marks=pytest.mark.slow),
                                                     ("cifar10", 12, ["train.activation_checkpointing=true"])])
def test_fsdp_compiles_every_block_once_and_runs_none_eager(layout, distinct, options, one_rank_group, monkeypatch):
    counter, compile = GraphCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, **{**kw, "backend": counter}))
    torch._dynamo.reset()
    cfg = load_config(ROOT / "configs" / f"{layout}.yaml",
                      ["engine=fsdp", "train.compile=true", "train.precision=fp32", "model.ch=32", "model.dropout=0.0",
                       *options])
    engine = build_engine(cfg, UNet(**vars(cfg.model)), torch.device("cpu"), one_rank_group)
    blocks, shapes = engine.module.blocks(), set()
    for block in blocks:
        block.register_forward_pre_hook(lambda m, args: shapes.add(block_signature(m, args[0])))
    r = cfg.model.resolution
    x, t = torch.randn(1, 3, r, r), torch.tensor([7])
    # Past the limit Dynamo would run the frame eagerly and only log a warning: make that an error.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in (1, 2):  # the second training step: no recompile, no block eager
            engine.model(x, t).sum().backward()
            assert (counter.graphs, counter.calls) == (len(blocks), step * len(blocks)), f"step {step}"
    assert len(shapes) == distinct > torch._dynamo.config.recompile_limit
