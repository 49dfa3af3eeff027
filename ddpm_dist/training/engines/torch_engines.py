"""Engines on plain PyTorch: `single` (no wrapper), `ddp` (DistributedDataParallel) and `fsdp`
(FSDP2 `fully_shard` per U-Net block, then the root; hybrid sharding on a 2-D mesh across
nodes). They share Adam, clipping, the fp16 loss scaler, the EMA and the DCP-ready state dict;
only wrapping and gradient sync differ."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dcp_sd
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ddpm_dist.config import OptimConfig
from ddpm_dist.distributed import DistInfo, any_flag, broadcast_from_main, collective_device
from ddpm_dist.runtime import DTYPES, autocast_context
from ddpm_dist.training.ema import EMA, local_views
from ddpm_dist.utils.logs import log

from .base import DynamicLossScaler, Engine, StepResult
from .dcp_files import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError, durable_writer, root_cause
from .settings import EngineSettings, fsdp_mesh_shape


def make_adam(o: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Adam:
    """The paper's Adam: no weight decay. The fused kernel (CUDA and CPU): one launch for all
    tensors, and it takes `found_inf`, so a non-finite step is skipped on the device."""
    return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=0.0, fused=True)


class TorchEngine(Engine):
    """single: `model` is the module itself; subclasses wrap it."""

    checkpoint_format = "dcp"

    def __init__(self, settings: EngineSettings, module: nn.Module, device: torch.device, info: DistInfo):
        self.settings, self.module, self.device, self.info = settings, module, device, info
        self.model = self._wrap(module)
        self.names, self.params = zip(*[(n, p) for n, p in module.named_parameters()])
        self.optimizer = make_adam(settings.optim, list(self.params))
        self.scaler = DynamicLossScaler(enabled=settings.precision == "fp16", device=device)
        self.ema = EMA(self.params, settings.ema_decay, names=self.names)
        self._param_views = local_views(self.params)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def autocast(self):
        return autocast_context(self.device, self.settings.precision)

    def _set_grad_sync(self, sync: bool) -> None:
        """Where the wrapper decides at backward time whether to reduce gradients (FSDP2)."""

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self._set_grad_sync(sync)
        self.scaler.scale_loss(loss).backward()

    def _global_grad_norm(self) -> torch.Tensor:
        """Clip to optim.grad_clip and return the norm before clipping, over all shards."""
        norm = nn.utils.clip_grad_norm_(self.params, self.settings.optim.grad_clip, foreach=True)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def step(self, lr: float) -> StepResult:
        """Everything is decided on the device, without reading a value back to the host: the
        skip flag (a non-finite global norm, the same on every rank) goes to fused Adam as
        `found_inf`, to the loss scaler and to the EMA weight."""
        self.scaler.unscale_(self.params)
        norm = self._global_grad_norm()
        found_inf = (~torch.isfinite(norm)).to(torch.float32)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.found_inf = found_inf  # fused Adam leaves params, moments and step alone
        self.optimizer.step()
        self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self._param_views, skip=found_inf)  # a skipped step leaves the EMA too
        return StepResult(grad_norm=norm, skipped=found_inf.bool())

    def local_params(self) -> list[torch.Tensor]:
        return list(self.params)  # the EMA takes DTensor shards' local parts itself

    def save(self, folder: Path) -> None:
        """DCP: every rank writes its shards, fsynced; any world size can load them."""
        dcp.save({"engine": self.state_dict()}, storage_writer=durable_writer(folder))

    def load(self, folder: Path) -> None:
        """DCP loads into this engine's tensors in place, resharding to this world size. Nothing in
        the folder is unpickled beyond checkpoint data (`dcp_files`); `.metadata` is read once,
        by rank 0, for all ranks (raising UnsafeCheckpointError here, before `dcp.load`, which
        would log and retry it)."""
        state = {"engine": self.state_dict()}
        reader = SafeFileSystemReader(folder)
        reader.share_metadata()
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        self.load_state_dict(state["engine"])

    def state_dict(self) -> dict:
        """Model and Adam via DCP's state_dict API (reshardable), EMA keyed like the model."""
        model_sd, optim_sd = dcp_sd.get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        dcp_sd.set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                              optim_state_dict=state["optim"])
        self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])

    def full_ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        full = {n: _full(t).detach().cpu().clone() for n, t in self.ema.state_dict().items()}
        return full if self.info.is_main else None


def _load_alone(folder: Path, state: dict) -> None:
    """`dcp.load` in this process alone, whatever process group is running."""
    reader = SafeFileSystemReader(folder)
    reader.read_metadata()  # raises UnsafeCheckpointError here, as in TorchEngine.load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)


_ERROR_KINDS = {"unsafe": UnsafeCheckpointError, "missing": FileNotFoundError, "other": RuntimeError}


def raise_where_rank0_failed(error: BaseException | None) -> None:
    """Collective: when rank 0's read failed (`error`), rank 0 raises it and every other rank an
    error of the same kind and first line, so that each rank's checkpoint message says why."""
    if not any_flag(error is not None):
        return
    described = None
    if error is not None:
        cause = root_cause(error)
        kind = ("unsafe" if isinstance(cause, UnsafeCheckpointError) else
                "missing" if isinstance(error, FileNotFoundError) else "other")
        described = {"kind": kind, "message": (str(cause).strip() or type(cause).__name__).splitlines()[0]}
    described = broadcast_from_main(described)
    if error is not None:
        raise error
    raise _ERROR_KINDS[described["kind"]](described["message"])


def broadcast_state(state: dict) -> dict:
    """Rank 0's `state` (nested dicts of tensors and plain values) on every rank: each tensor
    broadcast into this rank's in place, the plain values (few, small) as one object."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return state
    leaves, spec = tree_flatten(state)
    device = collective_device()
    plain = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    dist.broadcast_object_list(plain, src=0)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            leaves[i] = plain[i]
        elif leaf.device == device:
            dist.broadcast(leaf, src=0)
        else:  # NCCL sends only CUDA tensors (the loss scaler's state is on the CPU)
            moved = leaf.to(device)
            dist.broadcast(moved, src=0)
            leaf.copy_(moved)
    return tree_unflatten(leaves, spec)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class DDPEngine(TorchEngine):
    """Replicated weights, gradients all-reduced in backward, overlapped with it."""

    def _wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients are views into the all-reduce buckets: no copy in or out of them. Not
        # static_graph: DDP's reducer asserts under no_sync (gradient accumulation) with it.
        return DDP(module, device_ids=ids, gradient_as_bucket_view=True)

    def no_sync(self):
        # DDP decides at forward time whether backward reduces, so this wraps both.
        return self.model.no_sync()

    def load(self, folder: Path) -> None:
        """The state is replicated: rank 0 reads the checkpoint and broadcasts it, instead of
        every rank reading all of it (W times the checkpoint's bytes, 2 TiB at 512 ranks for the
        large model). Non-tensor values (Adam's param_groups) go along, so every rank ends with
        rank 0's state exactly."""
        state, error = {"engine": self.state_dict()}, None
        if self.info.is_main:
            try:
                _load_alone(folder, state)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                error = e
        raise_where_rank0_failed(error)
        self.load_state_dict(broadcast_state(state)["engine"])


class FSDPEngine(TorchEngine):
    """FSDP2: each Block (and the time embedding) its own FSDP unit, then the root; sharded over
    train.fsdp_shard_size ranks, the shard groups replicating each other."""

    def _wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = self._mesh()
        dtype = DTYPES[self.settings.precision]
        mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
        # The time MLP gets its own group so its fp32 sinusoidal input is cast to param_dtype
        # on entry (cast_forward_inputs); in the root group it would meet bf16 weights as fp32.
        for unit in [module.temb, *module.blocks()]:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)
        return module

    def _mesh(self):
        """One flat mesh, or 2-D (replicate, shard) for hybrid sharding: fully_shard then
        all-gathers and reduce-scatters within a shard group and all-reduces the gradient
        shards across the groups."""
        from torch.distributed.device_mesh import init_device_mesh
        replicas, shard = fsdp_mesh_shape(self.settings.fsdp_shard_size, self.info.world_size)
        if replicas == 1:
            return init_device_mesh(self.device.type, (shard,))
        log.info(f"fsdp: hybrid sharding, {replicas} replicas x {shard}-rank shard groups")
        return init_device_mesh(self.device.type, (replicas, shard), mesh_dim_names=("replicate", "shard"))

    def autocast(self):
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts weights and inputs

    def _set_grad_sync(self, sync: bool) -> None:
        # Off: gradients accumulate unsharded, unreduced; the last micro-batch reduce-scatters
        # (and, hybrid, all-reduces the shards across the groups).
        self.model.set_requires_gradient_sync(sync)

    @contextlib.contextmanager
    def ema_weights(self):
        from torch.distributed.fsdp import FSDPModule
        with super().ema_weights():
            yield
            for m in self.model.modules():  # drop gathered EMA weights before the live ones return
                if isinstance(m, FSDPModule):
                    m.reshard()
