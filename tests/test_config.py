"""Config loading: the shipped files, overrides, and one clear line for every mistake."""
from pathlib import Path

import pytest

from ddpm_dist.config import ConfigError, load_config, save_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))
PAPER = {  # Ho et al. 2020, Appendix B / the original code: lr, batch, steps, flip, variance
    "cifar10": (2e-4, 128, 800_000, True, "fixedlarge"),
    "celebahq": (2e-5, 64, 500_000, True, "fixedsmall"),
    "lsun_church": (2e-5, 64, 1_200_000, True, "fixedsmall"),
    "lsun_bedroom": (2e-5, 64, 2_400_000, True, "fixedsmall"),
    "lsun_cat": (2e-5, 64, 1_800_000, False, "fixedsmall"),
    "lsun_bedroom_large": (2e-5, 64, 1_150_000, True, "fixedsmall"),
}


def test_every_shipped_config_loads():
    assert {p.stem for p in CONFIGS} >= set(PAPER) | {"demo_digits"}
    for path in CONFIGS:
        load_config(path)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_papers_settings(name):
    cfg = load_config(f"configs/{name}.yaml")
    lr, batch, steps, flip, var = PAPER[name]
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.total_steps, cfg.data.flip,
            cfg.diffusion.model_var_type) == (lr, batch, steps, flip, var)
    assert (cfg.diffusion.schedule, cfg.diffusion.num_timesteps, cfg.diffusion.model_mean_type,
            cfg.diffusion.loss_type) == ("linear", 1000, "eps", "mse")
    assert (cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.train.ema_decay) == (5000, 1.0, 0.9999)
    assert cfg.model.dropout == (0.1 if name == "cifar10" else 0.0)


def test_overrides_are_typed():
    cfg = load_config("configs/demo_digits.yaml", ["train.total_steps=7", "optim.lr=3e-4", "engine=ddp",
                                                   "model.ch_mult=[1,2]", "data.flip=true"])
    assert cfg.train.total_steps == 7 and cfg.optim.lr == 3e-4 and cfg.engine == "ddp"
    assert cfg.model.ch_mult == (1, 2) and cfg.data.flip is True


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("configs/cifar10.yaml", ["seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg



def test_retired_keys_in_older_run_configs_are_ignored(tmp_path):
    # the config.yaml of runs and checkpoints written while DataConfig had shuffle_buffer
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  flip: false\n  shuffle_buffer: 1000\n")
    assert load_config(old) == load_config(None, ["data.flip=false"])


@pytest.mark.parametrize("overrides, message", [
    (["train.totl_steps=5"], "unknown key train.totl_steps; allowed keys under train: batch_size"),
    (["engine=fdsp"], "engine: 'fdsp' is not one of single, ddp, fsdp, deepspeed"),
    (["train.compile_mode=cudagraphs"], "train.compile_mode: 'cudagraphs' is not one of default, reduce-overhead"),
    (["diffusion.model_var_type=learned"], "diffusion.model_var_type: 'learned' is not one of fixedlarge, fixedsmall"),
    (["train.batch_size=lots"], "train.batch_size: expected int, got 'lots'"),
    (["data.flip=maybe"], "data.flip: expected true or false, got 'maybe'"),
    (["model.ch=48"], "model.ch: must be a multiple of 32"),
    (["train.total_steps=0"], "train.total_steps: must be positive, got 0"),
    (["model.resolution=20"], "model.resolution: 20 is not divisible by 2^3"),
    (["train.batch_size"], "override 'train.batch_size' is not of the form key.sub=value"),
    (["modle.ch=64"], "unknown key modle; allowed keys under the top level: model, diffusion"),
    (["model.in_channels=2", "model.out_ch=2"], "model.in_channels: must be 1 (grey) or 3 (RGB), got 2"),
    (["model.in_channels=1"], "model.out_ch: must equal model.in_channels (1), got 3"),
])
def test_mistakes_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/cifar10.yaml", overrides)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message), text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ch: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


@pytest.mark.parametrize("overrides, message", [
    (["train.ckpt_every=0"], "train.ckpt_every: must be positive, got 0"),
    (["train.log_every=0"], "train.log_every: must be positive, got 0"),
    (["train.sample_every=-5"], "train.sample_every: must be positive, got -5"),
    (["train.sample_steps=-1"], "train.sample_steps: must be 0 or more, got -1"),
    (["train.sample_steps=1"], "train.sample_steps: must be 0 (all steps) or at least 2, got 1"),
    (["data.retries=-1"], "data.retries: must be 0 or more, got -1"),
    (["data.num_workers=-2"], "data.num_workers: must be 0 or more, got -2"),
    (["train.micro_batch_size=0"], "train.micro_batch_size: must be positive, got 0"),
    (["train.micro_batch_size=48"], "train.micro_batch_size: 48 does not divide train.batch_size=128"),
    (["model.attn_resolutions=[16,12]"], "model.attn_resolutions: 12 is not a resolution of the U-Net (32, 16, 8, 4)"),
    (["model.attn_resolutions=[64]"], "model.attn_resolutions: 64 is not a resolution of the U-Net (32, 16, 8, 4)"),
])
def test_every_setting_is_validated(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/cifar10.yaml", overrides)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message), text


def test_an_empty_config_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty"):
        load_config(empty)


def test_a_micro_batch_that_does_not_fit_the_world_size_is_a_config_error():
    from ddpm_dist.training.engines import batch_split
    cfg = load_config("configs/cifar10.yaml", ["train.batch_size=4", "train.micro_batch_size=4"])
    assert batch_split(cfg, 1) == (4, 1)
    with pytest.raises(ConfigError, match=r"^train.micro_batch_size 4 does not divide the 2 images per rank "):
        batch_split(cfg, 2)


def _train(tmp_path, *args, config="configs/demo_digits.yaml"):
    import os
    import subprocess
    import sys
    import time
    cmd = [sys.executable, "-m", "ddpm_dist.train", "--config", str(config), f"out_dir={tmp_path / 'run'}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # no GPU in any case
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("args, message", [
    (["train.ckpt_every=0"], "train.ckpt_every: must be positive"),
    (["train.micro_batch_size=5"], "train.micro_batch_size: 5 does not divide train.batch_size=32"),
    (["model.attn_resolutions=[6]"], "model.attn_resolutions: 6 is not a resolution of the U-Net"),
    (["device=cuda"], "device=cuda but no CUDA device is visible"),
    ("empty", "is empty"),
])
def test_train_stops_with_one_line_and_status_2(tmp_path, args, message):
    if args == "empty":
        (tmp_path / "empty.yaml").write_text("")
        proc, seconds = _train(tmp_path, config=tmp_path / "empty.yaml")
    else:
        proc, seconds = _train(tmp_path, *args)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and err.startswith("error: ") and message in err, err
    assert seconds < 60  # generous: the check runs before any model or data is built (~3 s)


def test_an_out_path_in_a_missing_folder_is_created(tmp_path):
    from ddpm_dist.config import Config, ModelConfig
    from ddpm_dist.modelio.factory import build_model
    from ddpm_dist.modelio.model_file import load_model_file, save_model_file
    cfg = Config(model=ModelConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8))
    path = tmp_path / "not" / "yet" / "model.safetensors"  # tools/export.py, convert_diffusers.py --out
    save_model_file(path, build_model(cfg.model).state_dict(), cfg)
    assert load_model_file(path)[0].resolution == 8


# Values of numeric settings that are accepted, with what they mean; every other nan, inf,
# negative or zero value of every numeric setting is refused with one line naming the key.
ACCEPTED = {
    ("seed", "0"): "the first seed",
    ("data.num_workers", "0"): "data is loaded in the training process",
    ("data.retries", "0"): "a failed read is not retried",
    ("data.retry_wait", "0"): "retries follow at once",
    ("data.max_skip_fraction", "0"): "no skipped sample is tolerated",
    ("model.dropout", "0"): "no dropout",
    ("optim.beta1", "0"): "no momentum",
    ("optim.beta2", "0"): "no second-moment averaging",
    ("optim.warmup_steps", "0"): "no warm-up",
    ("train.ema_decay", "0"): "the EMA weights are the weights",
    ("train.zero_stage", "0"): "DeepSpeed without ZeRO partitioning",
    ("train.fsdp_shard_size", "0"): "FSDP2 shards over all ranks (no hybrid sharding)",
    ("train.num_samples", "0"): "no sample grids",
    ("train.sample_steps", "0"): "sample grids use every diffusion step",
    ("train.ckpt_every_minutes", "0"): "no timed checkpoints",
    ("train.hang_timeout", "0"): "no watchdog",
}


def _numeric_settings():
    """(key, is_tuple) for every int or float field of the config dataclasses, nested ones too."""
    import dataclasses
    import typing
    from ddpm_dist.config import Config

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
                continue
            args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
            is_tuple = typing.get_origin(tp) is tuple
            if tp in (int, float) or (args and set(args) <= {int, float}):
                yield f"{prefix}{f.name}", is_tuple
    return list(walk(Config, ""))


def test_the_walk_finds_the_numeric_settings():
    keys = {key for key, _ in _numeric_settings()}
    assert {"optim.lr", "optim.grad_clip", "train.hang_timeout", "seed", "model.ch_mult",
            "train.micro_batch_size", "data.max_skip_fraction", "optim.reference_batch",
            "train.fsdp_shard_size"} <= keys and len(keys) > 30


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "-1", "0"])
def test_every_numeric_setting_refuses_nan_inf_negative_and_zero_unless_documented(value):
    accepted = []
    for key, is_tuple in _numeric_settings():
        override = f"{key}=[{value}]" if is_tuple else f"{key}={value}"
        try:
            load_config("configs/cifar10.yaml", [override])
        except ConfigError as e:
            text = str(e)
            assert "\n" not in text and text.startswith(f"{key}:"), (override, text)
            continue
        accepted.append((key, value))
    assert set(accepted) == {k for k in ACCEPTED if k[1] == value}


@pytest.mark.parametrize("overrides, message", [
    (["optim.grad_clip=-1"], "optim.grad_clip: must be positive"),
    (["optim.lr=.nan"], "optim.lr: must be a finite number, got nan"),
    (["train.hang_timeout=.nan"], "train.hang_timeout: must be a finite number, got nan"),
    (["train.collective_timeout=.inf"], "train.collective_timeout: must be a finite number, got inf"),
    (["seed=-1"], "seed: must be 0 or more"),
    (["optim.beta2=1"], "optim.beta2: must be in [0, 1)"),
    (["model.ch_mult=[1,0]"], "model.ch_mult: must be positive"),
])
def test_out_of_range_numbers_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/cifar10.yaml", overrides)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message), text


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n", "just a string\n"])
def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.total_steps=5"])
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: expected a mapping"), info.value
