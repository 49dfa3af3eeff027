"""The training loop does not read device values back to the host between log points: on a
GPU each read (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.numpy()`) waits for every
queued kernel, so the CPU cannot run ahead. Counted around the real loop on CPU, where the same
calls happen (a read of a 0-d tensor is `aten._local_scalar_dense`)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_dist.config import load_config
from ddpm_dist.train import STOP_CHECK_EVERY, train

TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
        "diffusion.num_timesteps=20", "train.batch_size=4", "train.num_samples=1", "device=cpu",
        "engine=single", "train.log_every=10", "train.sample_every=1000000", "train.ckpt_every=1000000",
        "train.hang_timeout=0"]


class HostReads(TorchDispatchMode):
    """Counts scalar reads (aten._local_scalar_dense) and, through the Tensor methods that copy
    whole tensors out, `.tolist()` and `.numpy()`."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *a, _original=original, **k):
                self.count += 1
                return _original(tensor, *a, **k)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def reads_of_a_run(tmp_path, steps: int) -> int:
    cfg = load_config("configs/demo_digits.yaml", [*TINY, f"out_dir={tmp_path / str(steps)}",
                                                   f"train.total_steps={steps}"])
    with HostReads() as reads:
        assert train(cfg).step == steps
    return reads.count


def test_steady_state_steps_read_at_most_once_per_log_interval(tmp_path):
    # Two runs that differ only in length: set-up, the last step's grid and checkpoint cancel
    # out, leaving the reads of 40 steady steps: one log read per 10 steps and one stop-signal
    # agreement per STOP_CHECK_EVERY steps.
    short, long = reads_of_a_run(tmp_path, 20), reads_of_a_run(tmp_path, 60)
    per_step = (long - short) / 40
    assert per_step <= 1 / 10 + 1 / STOP_CHECK_EVERY <= 0.25, f"{per_step:.2f} host reads per step"


def test_the_counter_sees_item_float_bool_and_tolist():
    # The control: each way of reading a value counts once.
    t = torch.tensor([1.5, 2.0])
    with HostReads() as reads:
        t[0].item(), float(t[1]), bool(t[0] > 1), t.tolist(), t.numpy()
    assert reads.count == 5
