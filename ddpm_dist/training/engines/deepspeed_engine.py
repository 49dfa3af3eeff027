"""DeepSpeed ZeRO (stage 1/2/3 from `train.zero_stage`) behind the engine interface.

DeepSpeed owns the optimizer, clipping and the fp16 loss scaler; we keep the EMA beside its
parameters: whole tensors under ZeRO-1/2, each rank's flat partition (`ds_tensor`) under ZeRO-3.
A checkpoint holds the EMA once: each rank saves its partitions (ZeRO-3) or a 1/W block of the
whole EMA it shares with every rank (ZeRO-1/2), and on resume the blocks are all-gathered.
Its checkpoints are DeepSpeed's own format (in a `deepspeed/` sub-folder), which resumes only on
the same world size: DeepSpeed reshards them only after an offline `ds_to_universal.py` pass.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddpm_dist.distributed import DistInfo, any_flag, rank_block
from ddpm_dist.runtime import autocast_context
from ddpm_dist.training.ema import EMA, local_views
from ddpm_dist.utils.files import atomic_path, fsync_file, is_temp_file

from .base import DEEPSPEED_TAG, Engine, StepResult
from .settings import EngineSettings

EMA_BLOCK = "ema_block"  # ZeRO-0/1/2: the key of a rank's block of the flattened EMA in its file
INSTALL_HINT = "engine=deepspeed needs `pip install ddpm-dist[deepspeed]`"


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return deepspeed


def ds_config(settings: EngineSettings, micro_batch: int, accum_steps: int, device: torch.device) -> dict:
    """The paper's Adam, clipping and precision as a DeepSpeed config."""
    o, precision = settings.optim, settings.precision
    # torch's Adam inside DeepSpeed: its fused kernel on CUDA (one launch for all tensors, as
    # the torch engines use), foreach on CPU. DeepSpeed's own fused Adam is a JIT build that
    # takes minutes on a 2-core CPU and needs a CUDA toolkit on GPU nodes.
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "optimizer": {"type": "Adam", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                 "weight_decay": 0.0, "torch_adam": True,
                                                 "adam_w_mode": False, **kernel}},
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # fp16 scaler constants as torch.amp.GradScaler's: 2^16 initial, window 2000.
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 2000},
        "steps_per_print": 10 ** 9,
    }


def check_supported(settings: EngineSettings) -> None:
    """Refuse, in one line, what DeepSpeed would reject with a deep traceback."""
    from deepspeed.accelerator import get_accelerator
    if settings.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage: must be 0, 1, 2 or 3, got {settings.zero_stage}")
    accel = get_accelerator()
    if settings.precision == "fp16" and not accel.is_fp16_supported():
        raise RuntimeError(f"engine=deepspeed: precision=fp16 is not supported on DeepSpeed's "
                           f"{accel.device_name()} accelerator; use bf16 or fp32 (or engine=fsdp)")


_NAMES_A_RANK = re.compile(r"(?:zero_pp_rank_|ema_rank)(\d+)\D")


def fsync_rank_files(folder: Path, rank: int) -> None:
    """DeepSpeed does not fsync: each rank syncs the files of `folder/deepspeed/` that name it
    (`[bf16_]zero_pp_rank_<r>_*`, `ema_rank<r>.pt`), rank 0 also those that name no rank (model
    states, recovery scripts) and `latest`. Never another rank's file: that rank may be renaming
    it at this moment (a temp file that vanishes under `open`)."""
    mine = []
    for path in (folder / DEEPSPEED_TAG).iterdir():
        named = _NAMES_A_RANK.search(path.name)
        if not is_temp_file(path) and (int(named.group(1)) == rank if named else rank == 0):
            mine.append(path)
    if rank == 0 and (folder / "latest").is_file():
        mine.append(folder / "latest")
    for path in mine:
        fsync_file(path)


class DeepSpeedEngine(Engine):
    checkpoint_format = "deepspeed"

    def __init__(self, settings: EngineSettings, module: nn.Module, device: torch.device, info: DistInfo,
                 micro_batch: int, accum_steps: int):
        deepspeed = import_deepspeed()
        check_supported(settings)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.settings, self.module, self.device, self.info = settings, module, device, info
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=list(module.parameters()),
            config=ds_config(settings, micro_batch, accum_steps, device))
        self.names, params = zip(*module.named_parameters())
        self.params = list(params)
        self.ema = EMA(self.local_params(), settings.ema_decay, names=self.names)
        self._partitioned = any(hasattr(p, "ds_tensor") for p in self.params)  # ZeRO-3
        # bf16/fp32: DeepSpeed applies a step with non-finite gradients (see `step`).
        self.skips_nonfinite_steps = settings.precision == "fp16"

    def local_params(self) -> list[torch.Tensor]:
        """What this rank holds of each parameter: its ZeRO-3 partition, else the tensor."""
        return [getattr(p, "ds_tensor", p) for p in self.params]

    def autocast(self):
        # DeepSpeed casts the weights to bf16/fp16 but not the UNet's fp32 time embedding.
        return autocast_context(self.device, self.settings.precision)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # The caller has already divided by the number of micro-batches.
        self.model.set_gradient_accumulation_boundary(sync)
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        skipped_before = self.model.skipped_steps
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        # fp16: DeepSpeed's scaler skips overflowing steps (it reads the overflow flag on the
        # host itself). bf16/fp32: it does not check, so a non-finite step is applied and
        # reported as not skipped; `skips_nonfinite_steps` is False and the loop stops at the
        # first non-finite step it sees.
        skipped = self.model.skipped_steps > skipped_before
        if not skipped:
            self.ema.update(local_views(self.local_params()))
        return StepResult(grad_norm=norm, skipped=torch.tensor(skipped))

    def save(self, folder: Path) -> None:
        """DeepSpeed's checkpoint plus one EMA file per rank, fsynced: under ZeRO-3 the rank's EMA
        partitions; below it every rank holds the same whole EMA, so each saves a 1/W block of
        it (one EMA in the checkpoint, not W copies)."""
        self.model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        share = self.ema.state_dict() if self._partitioned else {EMA_BLOCK: self._ema_block()}
        with atomic_path(self._ema_file(folder)) as tmp:
            torch.save(share, tmp)
        fsync_rank_files(Path(folder), self.info.rank)

    def load(self, folder: Path) -> None:
        loaded, _ = self.model.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        if loaded is None:  # DeepSpeed logs a warning and returns None instead of raising
            raise FileNotFoundError(f"nothing DeepSpeed can load in {DEEPSPEED_TAG}/")
        share = torch.load(self._ema_file(folder), map_location=self.device, weights_only=True)
        if self._partitioned or EMA_BLOCK not in share:  # ZeRO-3; or a whole EMA per rank (older saves)
            self.ema.load_state_dict(share)
        else:
            self._gather_ema_blocks(share[EMA_BLOCK])

    def _ema_file(self, folder: Path) -> str:
        return os.path.join(folder, DEEPSPEED_TAG, f"ema_rank{self.info.rank}.pt")

    def _ema_block(self) -> torch.Tensor:
        """This rank's contiguous block of the EMA, all tensors flattened in order (a copy)."""
        block = rank_block(sum(e.numel() for e in self.ema.shadow), self.info.rank, self.info.world_size)
        pieces, offset = [], 0
        for e in self.ema.shadow:
            lo, hi = max(block.start - offset, 0), min(block.stop - offset, e.numel())
            if lo < hi:
                pieces.append(e.flatten()[lo:hi])
            offset += e.numel()
        return torch.cat(pieces) if pieces else torch.empty(0, device=self.device)

    def _gather_ema_blocks(self, mine: torch.Tensor) -> None:
        """Collective: every rank's block, all-gathered into every rank's whole EMA."""
        total, world = sum(e.numel() for e in self.ema.shadow), self.info.world_size
        sizes = [len(rank_block(total, r, world)) for r in range(world)]
        fits = isinstance(mine, torch.Tensor) and mine.shape == (sizes[self.info.rank],)
        if any_flag(not fits):
            raise ValueError(f"the EMA blocks do not fit this model on {world} ranks")
        padded = torch.zeros(max(sizes), dtype=torch.float32, device=self.device)
        padded[:len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        flat = torch.cat([part[:size] for part, size in zip(parts, sizes)])
        for e, piece in zip(self.ema.shadow, flat.split([e.numel() for e in self.ema.shadow])):
            e.copy_(piece.view_as(e))

    def full_ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        full = {n: self._gather(p, e).cpu().clone() for n, p, e in zip(self.names, self.params, self.ema.shadow)}
        return full if self.info.is_main else None

    def _gather(self, param: nn.Parameter, ema: torch.Tensor) -> torch.Tensor:
        """ZeRO-3: concatenate every rank's (padded) flat partition, cut, reshape."""
        if not hasattr(param, "ds_tensor"):
            return ema
        parts = [torch.empty_like(ema) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, ema.contiguous())
        return torch.cat([t.flatten() for t in parts])[:param.ds_numel].view(param.ds_shape)
