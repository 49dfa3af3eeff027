"""DCP checkpoint files written durably and read without running code from them.

DCP pickles its `.metadata` and the non-tensor values of a state dict (Adam's param_groups) and
unpickles them on load: a crafted checkpoint folder could run code. `SafeFileSystemReader` reads
`.metadata` with an unpickler that admits only what torch 2.13 writes there: the classes of
`torch.distributed.checkpoint.metadata`, DCP's `_StorageInfo`, `torch.Size`, dtypes, the layout
lookup, and the `PosixPath` DCP stores as the checkpoint id; containers and numbers are pickle
opcodes, not globals. The tensor files it names must lie inside the checkpoint folder.
`SafeLoadPlanner` loads the non-tensor values with `weights_only=True`. Tensors DCP already
loads with `weights_only=True`.
"""
from __future__ import annotations

import io
from pathlib import PurePosixPath
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element

from ddpm_dist.distributed import any_flag, broadcast_bytes
from ddpm_dist.utils.pickles import RefusedPickleError, RestrictedUnpickler

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = frozenset({
    *((_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a name up among torch's layouts
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})


class UnsafeCheckpointError(RefusedPickleError):
    """A checkpoint file asks to load something other than checkpoint data."""


class _MetadataUnpickler(RestrictedUnpickler):
    what = "DCP checkpoint metadata"
    error = UnsafeCheckpointError

    def allowed(self, module: str, name: str) -> bool:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        return (module, name) in ALLOWED_GLOBALS or is_dtype


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read with the restricted unpickler, once: DCP asks
    for it again inside `dcp.load`, and at 512 ranks the file is about 100 MB."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None or kwargs.get("rank") is not None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _parse_metadata(f.read(), path)
            if kwargs.get("rank") is not None:
                return _stamp(metadata, self.load_id)
            self._metadata = metadata
        return _stamp(self._metadata, self.load_id)

    def share_metadata(self) -> None:
        """Collective: rank 0 reads `.metadata` and sends its bytes to every rank, which parses
        them with the restricted unpickler; then `read_metadata` reads no file. FileNotFoundError
        on every rank when rank 0 cannot read it."""
        path, data, missing = self._get_metadata_path(), None, None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                with self.fs.create_stream(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                missing = e.strerror or type(e).__name__
        if any_flag(missing is not None):
            raise FileNotFoundError(f"no readable .metadata ({missing or 'on rank 0'})")
        self._metadata = _parse_metadata(broadcast_bytes(data), path)


def _parse_metadata(data: bytes, path) -> Metadata:
    metadata = _MetadataUnpickler(io.BytesIO(data), path).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path} refused: it holds a {type(metadata).__name__}, not DCP Metadata")
    _check_storage_paths(metadata, path)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _stamp(metadata: Metadata, load_id) -> Metadata:
    metadata.storage_meta.load_id = load_id
    return metadata


def root_cause(e: BaseException) -> BaseException:
    """DCP wraps each rank's exception in a CheckpointException: the first one inside."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))
        e = e[0] if isinstance(e, tuple) else e  # (exception, traceback) per rank
    return e


def _check_storage_paths(metadata: Metadata, path) -> None:
    """Every tensor file named by `.metadata` lies in the checkpoint folder: a plain relative
    name, no '..', no absolute path (DCP joins it to the folder as it is)."""
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        parts = PurePosixPath(str(name)).parts
        if not isinstance(name, str) or not parts or name.startswith("/") or ".." in parts or "\\" in name:
            raise UnsafeCheckpointError(f"{path} refused: it points tensor storage at {name!r}, outside the "
                                        f"checkpoint folder (load checkpoints only from sources you trust)")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that unpickles non-tensor values with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def durable_writer(folder) -> FileSystemWriter:
    """Every file fsynced before `dcp.save` returns."""
    return FileSystemWriter(folder, sync_files=True)
