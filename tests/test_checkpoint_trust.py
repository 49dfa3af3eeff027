"""A checkpoint folder is loaded only when every file matches the sha256 its manifest recorded at
save time: an altered or planted file is refused with one line before anything is unpickled, DCP
storage paths stay inside the folder, and checkpoints without hashes follow a stated policy."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ddpm_dist.config import Config, ModelConfig
from ddpm_dist.distributed import DistInfo
from ddpm_dist.training.checkpoint import (CheckpointError, load_checkpoint, resumable_checkpoint,
                                           save_checkpoint)
from ddpm_dist.training.engines import build_engine
from ddpm_dist.training.engines.base import DEEPSPEED_TAG
from ddpm_dist.unet import UNet
from ddpm_dist.utils.download import file_sha256

TINY = ModelConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8, dropout=0.0)
CPU = DistInfo(0, 1, 0, torch.device("cpu"), True)


class _WritesFile:
    """Unpickling this creates a file, as a crafted checkpoint file could run any code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def new_engine():
    cfg = Config(model=TINY, engine="single")
    cfg.train.batch_size, cfg.train.compile = 2, "false"
    torch.manual_seed(0)
    return build_engine(cfg, UNet(**vars(cfg.model)), torch.device("cpu"), CPU), cfg


def saved(tmp_path, step=4) -> tuple[Path, object]:
    engine, cfg = new_engine()
    path = save_checkpoint(tmp_path / "checkpoints", step, engine, {"data": {}}, keep_last=5, cfg=cfg)
    return path, engine


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def rewrite_manifest(path: Path) -> None:
    """As an attacker who controls the folder would: sizes and hashes that match the files."""
    files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
    files.pop("manifest.json")
    content = manifest(path)
    content["files"] = {name: p.stat().st_size for name, p in files.items()}
    if "sha256" in content:
        content["sha256"] = {name: file_sha256(p) for name, p in files.items()}
    (path / "manifest.json").write_text(json.dumps(content))


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    path, _ = saved(tmp_path)
    content = manifest(path)
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(content["sha256"]) == on_disk == set(content["files"])
    assert all(content["sha256"][name] == file_sha256(path / name) for name in on_disk)


def test_altered_file_of_the_same_size_is_refused_in_one_line(tmp_path):
    path, _ = saved(tmp_path)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: same size, other content
    shard.write_bytes(bytes(data))
    engine, _ = new_engine()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match its sha256") as e:
        load_checkpoint(path, engine)
    assert "\n" not in str(e.value)


def test_planted_file_is_refused_before_anything_is_unpickled(tmp_path):
    path, _ = saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / DEEPSPEED_TAG).mkdir()
    torch.save(_WritesFile(marker), path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt")
    engine, _ = new_engine()
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt is not listed in manifest\.json"):
        load_checkpoint(path, engine)
    assert not marker.exists()


def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    older, _ = saved(tmp_path, step=4)
    newer, _ = saved(tmp_path, step=8)
    (newer / "rank0.json").write_text((newer / "rank0.json").read_text().replace("8", "9"))
    assert resumable_checkpoint(tmp_path / "checkpoints") == older


def test_dcp_storage_path_outside_the_folder_is_refused(tmp_path):
    path, _ = saved(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(path / "__0_0.distcp", outside / "__0_0.distcp")
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own file, written just now
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere/__0_0.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest(path)
    engine, _ = new_engine()
    with pytest.raises(CheckpointError, match=r"\.\./\.\./elsewhere/__0_0\.distcp.*outside"):
        load_checkpoint(path, engine)


def test_dcp_checkpoint_without_hashes_loads_through_the_restricted_unpickler(tmp_path):
    path, written = saved(tmp_path)
    content = manifest(path)
    del content["sha256"]  # as an older ddpm-dist wrote it
    (path / "manifest.json").write_text(json.dumps(content))
    engine, _ = new_engine()
    for p in engine.params:
        p.data.zero_()
    load_checkpoint(path, engine)
    assert all(torch.equal(a, b) for a, b in zip(engine.params, written.params))


def test_deepspeed_checkpoint_without_hashes_is_refused(tmp_path):
    """DeepSpeed's loader unpickles with weights_only=False: without hashes nothing is vouched for."""
    path, _ = saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / DEEPSPEED_TAG).mkdir()
    torch.save(_WritesFile(marker), path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt")
    content = manifest(path)
    del content["sha256"]
    (path / "manifest.json").write_text(json.dumps(content))
    rewrite_manifest(path)
    engine, _ = new_engine()
    with pytest.raises(CheckpointError, match=r"no sha256.*DeepSpeed") as e:
        load_checkpoint(path, engine)
    assert "\n" not in str(e.value) and not marker.exists()


def _deepspeed_worker(rank: int, port: int, ckpt_dir: str, marker: str) -> None:
    """One DeepSpeed rank: save a checkpoint, swap its model-states file for a pickle that
    creates `marker` (the manifest's sizes updated, its hashes not), then resume."""
    import os

    from ddpm_dist.distributed import init_distributed, teardown
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        cfg = Config(model=TINY, engine="deepspeed")
        cfg.train.batch_size, cfg.train.compile, cfg.train.precision = 2, "false", "fp32"
        torch.manual_seed(0)
        engine = build_engine(cfg, UNet(**vars(cfg.model)), torch.device("cpu"), info)
        path = save_checkpoint(Path(ckpt_dir), 4, engine, {"data": {}}, keep_last=5, cfg=cfg)
        states = next((path / DEEPSPEED_TAG).glob("mp_rank_00_model_states.pt"))
        torch.save(_WritesFile(Path(marker)), states)
        content = manifest(path)
        content["files"][states.relative_to(path).as_posix()] = states.stat().st_size
        (path / "manifest.json").write_text(json.dumps(content))
        try:
            load_checkpoint(path, engine)
        except CheckpointError as e:
            assert "mp_rank_00_model_states.pt does not match its sha256" in str(e), e
        else:
            raise AssertionError("the altered DeepSpeed checkpoint was loaded")
    finally:
        teardown()


@pytest.mark.slow  # DeepSpeed's initialisation: ~20 s on 2 cores
def test_altered_deepspeed_checkpoint_is_refused_before_deepspeed_unpickles_it(tmp_path):
    import torch.multiprocessing as mp

    from ddpm_dist.distributed import free_port
    marker = tmp_path / "pwned"
    mp.spawn(_deepspeed_worker, args=(free_port(), str(tmp_path / "checkpoints"), str(marker)), nprocs=1, join=True)
    assert not marker.exists()
