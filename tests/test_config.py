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


@pytest.mark.parametrize("overrides, message", [
    (["train.totl_steps=5"], "unknown key train.totl_steps; allowed keys under train: batch_size"),
    (["engine=fdsp"], "engine: 'fdsp' is not one of single, ddp, fsdp, deepspeed"),
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
