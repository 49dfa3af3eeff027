"""Recipes at 64 nodes x 8 GPUs: a global batch larger than the paper's with a recorded
learning-rate rule, the one line a batch that does not split over the ranks gives, and hybrid
sharding (FSDP2 within a node, replicas across nodes) against plain FSDP2 with real gloo ranks."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddpm_dist.config import ConfigError, load_config, save_config
from ddpm_dist.distributed import free_port, init_distributed, teardown
from ddpm_dist.train import learning_rate
from tests.test_engines import assert_same, full_model_state, make_cfg, new_engine, train

W = 512  # 64 nodes x 8 GPUs


@pytest.mark.parametrize("name", ["cifar10", "celebahq", "lsun_bedroom_large"])
def test_the_paper_configs_train_with_the_papers_numbers(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.optim.scale_rule == "none"
    assert cfg.optim.effective(cfg.train.batch_size) == (cfg.optim.lr, 5000)
    assert learning_rate(cfg, 4999) == cfg.optim.lr and learning_rate(cfg, 0) == cfg.optim.lr / 5000


@pytest.mark.parametrize("rule, lr", [("linear", 8e-4), ("sqrt", 4e-4)])
def test_a_larger_batch_scales_the_lr_and_keeps_the_warm_up_in_images(rule, lr):
    # 512 = 4 x the paper's 128: warm-up over the same 640,000 images = 1,250 steps
    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=512", f"optim.scale_rule={rule}",
                                               "optim.reference_batch=128"])
    assert cfg.optim.lr == 2e-4, "the config keeps the number it was given"
    got_lr, warmup = cfg.optim.effective(cfg.train.batch_size)
    assert (got_lr, warmup) == (pytest.approx(lr, rel=1e-12), 1250)
    assert learning_rate(cfg, 1249) == got_lr and learning_rate(cfg, 0) == pytest.approx(lr / 1250)


def test_a_smaller_batch_scales_down_and_lengthens_the_warm_up():
    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=32", "optim.scale_rule=linear",
                                               "optim.reference_batch=128"])
    assert cfg.optim.effective(32) == (pytest.approx(5e-5), 20_000)


def test_a_rule_without_its_reference_batch_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config("configs/cifar10.yaml", ["optim.scale_rule=linear"])
    assert str(info.value) == ("optim.scale_rule=linear needs optim.reference_batch: the global batch "
                               "optim.lr and optim.warmup_steps were set for (the paper's: 128 for CIFAR-10, "
                               "64 at 256²)")
    with pytest.raises(ConfigError, match="^optim.scale_rule: 'cubic' is not one of none, linear, sqrt$"):
        load_config("configs/cifar10.yaml", ["optim.scale_rule=cubic"])


def test_the_saved_config_shows_the_values_the_run_uses_and_reloads_identically(tmp_path):
    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=512", "optim.scale_rule=linear",
                                               "optim.reference_batch=128"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.splitlines()[0] == ("# this run uses optim.lr 0.0008 and optim.warmup_steps 1250: "
                                    "optim.scale_rule=linear from optim.reference_batch 128 to train.batch_size 512")
    assert load_config(tmp_path / "config.yaml") == cfg
    save_config(load_config("configs/cifar10.yaml"), tmp_path / "paper.yaml")
    assert not (tmp_path / "paper.yaml").read_text().startswith("#"), "nothing scaled: nothing to say"


def test_resume_refuses_another_rule_and_accepts_another_shard_size(tmp_path):
    from ddpm_dist.training.checkpoint import CheckpointError, resume_config_changes
    scaled = ["train.batch_size=512", "optim.scale_rule=linear", "optim.reference_batch=128"]
    save_config(load_config("configs/cifar10.yaml", scaled), tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match=r"other settings: optim.scale_rule \(linear → sqrt\); resume"):
        resume_config_changes(tmp_path, load_config("configs/cifar10.yaml", [*scaled, "optim.scale_rule=sqrt"]))
    assert resume_config_changes(tmp_path, load_config("configs/cifar10.yaml", [*scaled, "engine=fsdp",
                                                                                "train.fsdp_shard_size=0"])) == {}


def test_a_checkpoint_from_before_the_rule_resumes_with_the_paper_config(tmp_path):
    from ddpm_dist.training.checkpoint import resume_config_changes
    from ddpm_dist.config import config_to_dict
    import yaml
    older = config_to_dict(load_config("configs/cifar10.yaml"))
    for section, key in (("optim", "scale_rule"), ("optim", "reference_batch"), ("train", "fsdp_shard_size")):
        del older[section][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    assert resume_config_changes(tmp_path, load_config("configs/cifar10.yaml")) == {}


def test_a_scaled_batch_that_still_cannot_be_split_says_so():
    from ddpm_dist.training.engines import batch_split
    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=640", "optim.scale_rule=sqrt",
                                               "optim.reference_batch=128"])
    with pytest.raises(ConfigError) as info:
        batch_split(cfg, W)
    assert str(info.value) == ("train.batch_size 640 cannot be split over 512 ranks: set train.batch_size to a "
                               "multiple of 512 (e.g. 1024); optim.scale_rule=sqrt scales optim.lr and "
                               "optim.warmup_steps to it from optim.reference_batch 128")


SPLIT_LINE = ("error: train.batch_size 128 cannot be split over 512 ranks: set train.batch_size to a "
              "multiple of 512 (e.g. 512) with optim.scale_rule=linear (or sqrt) and "
              "optim.reference_batch=128 to scale optim.lr and optim.warmup_steps")


def _train_cli(tmp_path, env: dict, *overrides, config="configs/cifar10.yaml"):
    cmd = [sys.executable, "-m", "ddpm_dist.train", "--config", config, f"out_dir={tmp_path / 'run'}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_the_papers_batch_over_512_ranks_says_what_to_set_before_the_rendezvous(tmp_path):
    # Rank 0 of 512 as torchrun starts it; no other rank exists, so a rendezvous would wait
    # out its timeout: the line must come first, and nothing may be written.
    env = {"RANK": "0", "WORLD_SIZE": str(W), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = _train_cli(tmp_path, env)
    assert (proc.returncode, proc.stderr.strip()) == (2, SPLIT_LINE)
    assert not (tmp_path / "run").exists()


def test_a_micro_batch_that_does_not_fit_the_ranks_share_says_what_to_set():
    from ddpm_dist.training.engines import batch_split
    for batch, micro, per_rank, fits in ((512, 4, 1, 1), (1536, 2, 3, 1), (2560, 10, 5, 5)):
        cfg = load_config("configs/cifar10.yaml", [f"train.batch_size={batch}", f"train.micro_batch_size={micro}"])
        with pytest.raises(ConfigError) as info:
            batch_split(cfg, W)
        images = "image" if per_rank == 1 else "images"
        assert str(info.value) == (f"train.micro_batch_size {micro} does not divide the {per_rank} {images} per "
                                   f"rank (train.batch_size {batch} over {W} ranks): set train.micro_batch_size "
                                   f"to a divisor of {per_rank} (e.g. {fits})")
    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=4096", "train.micro_batch_size=4"])
    assert batch_split(cfg, W) == (4, 2)


# --- hybrid sharding ----------------------------------------------------------------------

@pytest.mark.parametrize("setting, env, shape", [
    (None, {"LOCAL_WORLD_SIZE": "8"}, (64, 8)),                  # torchrun: one node per shard group
    (None, {"SLURM_NTASKS_PER_NODE": "8"}, (64, 8)),             # srun
    (None, {"SLURM_NTASKS_PER_NODE": "8(x64)"}, (64, 8)),
    (None, {}, (1, W)),                                          # node size unknown: one flat mesh
    (None, {"SLURM_NTASKS_PER_NODE": "8(x60),4(x8)"}, (1, W)),   # uneven nodes: one flat mesh
    (0, {"LOCAL_WORLD_SIZE": "8"}, (1, W)),                      # 0: all ranks, plain FSDP2
    (16, {"LOCAL_WORLD_SIZE": "8"}, (32, 16)),
    (W, {}, (1, W)),
])
def test_the_fsdp_mesh_shards_within_a_node_and_replicates_across(setting, env, shape):
    from ddpm_dist.training.engines import fsdp_mesh_shape
    assert fsdp_mesh_shape(setting, W, env) == shape


def test_a_shard_size_that_does_not_divide_the_ranks_is_one_line_before_the_rendezvous(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = _train_cli(tmp_path, env, "engine=fsdp", "train.fsdp_shard_size=3")
    assert (proc.returncode, proc.stderr.strip()) == (2, "error: train.fsdp_shard_size 3 does not divide the 8 "
                                                         "ranks: set it to a divisor of 8 (e.g. the ranks of one "
                                                         "node), or 0 to shard over all ranks")
    assert not (tmp_path / "run").exists()


STEPS = 3


def _hybrid_worker(rank: int, port: int, out_dir: str) -> None:
    """4 ranks as 2 nodes of 2: plain FSDP2 and hybrid train the same steps from the same start
    and take one more; then each loads the other's checkpoint and takes that step again."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    out, engines = {}, {}
    try:
        for name, shard in (("flat", 0), ("hybrid", None)):  # None: the default, one node per group
            engine = engines[name] = new_engine(make_cfg("fsdp", accum=2, world=4, fsdp_shard_size=shard), info)
            out[name] = _record(engine, train(engine, rank, 4, 2))
            engine.save(Path(out_dir) / name)
            out[name + "+1"] = _record(engine, _one_more_step(engine, rank))
        for name, other in (("hybrid", "flat"), ("flat", "hybrid")):
            engines[name].load(Path(out_dir) / other)
            out[f"{name} from {other}"] = _record(engines[name], [])
            out[f"{name} from {other}+1"] = _record(engines[name], _one_more_step(engines[name], rank))
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "out.pt"))
    finally:
        teardown()


def _record(engine, results) -> dict:
    """Full weights and EMA, the grad norms, the mesh, and an EMA forward (as sample grids run it)."""
    mesh = engine.ema.state_dict()["conv_in.weight"].device_mesh
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([5, 500])
    with torch.no_grad(), engine.ema_weights():
        ema_out = engine.model(x, t)
    return {"model": full_model_state(engine), "ema": engine.full_ema_state_dict(), "ema_out": ema_out,
            "grad_norms": [float(r.grad_norm) for r in results], "mesh": tuple(mesh.shape)}


def _one_more_step(engine, rank: int) -> list:
    from ddpm_dist.modelio.factory import build_diffusion
    from ddpm_dist.config import DiffusionConfig
    from ddpm_dist.training.step import train_step
    from tests.test_engines import LR, batches
    x, t, noise = (a.chunk(4)[rank] for a in batches()[-1])
    return [train_step(engine, build_diffusion(DiffusionConfig()), [(x, t, noise)], LR).result]


@pytest.mark.slow  # four gloo processes on 2 busy cores
def test_hybrid_sharding_trains_and_resumes_like_plain_fsdp(tmp_path):
    mp.spawn(_hybrid_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert (got["flat"]["mesh"], got["hybrid"]["mesh"]) == ((4,), (2, 2))
    flat, hybrid = got["flat"], got["hybrid"]
    assert all(math.isfinite(n) for n in flat["grad_norms"])
    assert hybrid["grad_norms"] == pytest.approx(flat["grad_norms"], rel=1e-5)
    # Not bit for bit: gradients are summed in another order (2 + 2 ranks, not 4), and Adam's
    # division by sqrt(v) amplifies the rounding (measured: 6e-6 in the weights, 8e-7 in the
    # EMA after 3 steps); within test_engines' tolerance for reduction-order noise.
    assert_same(hybrid["model"], flat["model"], "hybrid model")
    assert_same(hybrid["ema"], flat["ema"], "hybrid ema")
    torch.testing.assert_close(hybrid["ema_out"], flat["ema_out"], rtol=1e-4, atol=1e-5)
    for name, other in (("hybrid", "flat"), ("flat", "hybrid")):
        loaded = got[f"{name} from {other}"]
        assert_same(loaded["model"], got[other]["model"], f"{name} loading {other}", exact=True)
        assert_same(loaded["ema"], got[other]["ema"], f"{name} loading {other} ema", exact=True)
        torch.testing.assert_close(loaded["ema_out"], got[other]["ema_out"], rtol=1e-5, atol=1e-6)
        # the Adam moments came back: the next step is the one the writer took
        assert_same(got[f"{name} from {other}+1"]["model"], got[other + "+1"]["model"], f"{name} step after resume")
