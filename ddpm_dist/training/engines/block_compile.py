"""torch.compile of each U-Net block on its own, for engines whose wrapper hooks every block
(FSDP2, DeepSpeed): the hooks run between the compiled blocks, as in torchtitan's per-block
compile.

Dynamo keeps a function's compiled graphs on its code object, at most `recompile_limit` (8) of
them. Every Block shares `Block.forward`'s code, and the U-Net's blocks come in more distinct
shapes than that (12 at 32², 19 at 256², counting input and weight shapes): compiled through
that one code object, the blocks past the limit ran eager with only a logged warning, and the
first recompiles had made the shapes dynamic. So each block is called through a code object of its own, named after the block: one
static graph per block and input shape, never a shared cache to overflow.
"""
from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn


def own_frame(fn: Callable, name: str) -> Callable:
    """`fn`, called through a function whose code object is new and named `name`: the frame
    Dynamo compiles, and so the key of its graph cache and of its recompile count."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)
    names = {"co_name": name, **({"co_qualname": name} if hasattr(call.__code__, "co_qualname") else {})}
    code = call.__code__.replace(**names)
    return types.FunctionType(code, call.__globals__, name, None, call.__closure__)


def compile_blocks(model: nn.Module, blocks: list[nn.Module], mode: str) -> None:
    """Compile each of `blocks` (modules of `model`) through its own frame, in place: the
    block's forward (with its activation checkpointing, if any) becomes the compiled call, so
    hooks on the block stay outside the graph and parameter names do not change."""
    ids = {id(b) for b in blocks}
    for name, block in model.named_modules():
        if id(block) in ids:
            frame = own_frame(block.forward, "block_" + name.replace(".", "_"))
            block.forward = torch.compile(frame, mode=mode)
