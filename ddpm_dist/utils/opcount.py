"""Counting the aten ops a piece of code dispatches: on a GPU each compute op is a kernel
launch, so a count that grows with the batch marks a Python loop over samples."""
from __future__ import annotations

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """While active, counts every aten op (views and copies included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """The number of aten ops `fn()` dispatches."""
    with OpCounter() as counter:
        fn()
    return counter.count
