"""The paper's U-Net: parameter counts of the published models, shapes, initialisation."""
import math

import pytest
import torch

from ddpm_dist.config import load_config
from ddpm_dist.modelio.factory import build_model
from ddpm_dist.unet import AttnBlock, Block, UNet, count_parameters, timestep_embedding


@pytest.mark.parametrize("config, millions", [
    ("configs/cifar10.yaml", 35.75), ("configs/celebahq.yaml", 113.67), ("configs/lsun_church.yaml", 113.67),
    ("configs/lsun_bedroom.yaml", 113.67), ("configs/lsun_cat.yaml", 113.67),
    ("configs/lsun_bedroom_large.yaml", 255.68)])
def test_paper_configs_have_the_papers_parameter_counts(config, millions):
    with torch.device("meta"):  # counting needs shapes only
        model = build_model(load_config(config).model)
    assert round(count_parameters(model) / 1e6, 2) == millions


def test_forward_shape_and_zero_output_at_init():
    model = UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16, dropout=0.0)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    out = model(x, t)
    assert out.shape == x.shape
    # The final conv is zero-initialised, so the untrained network predicts ε = 0.
    assert out.abs().max() == 0
    for block in model.blocks():
        assert block.res.conv2.weight.abs().max() == 0
        if block.attn is not None:
            assert block.attn.proj_out.weight.abs().max() == 0


def test_attention_sits_at_the_listed_resolutions():
    model = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), resolution=16)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for m in model.modules()
             if isinstance(m, AttnBlock)]
    model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    for h in hooks:
        h.remove()
    # 2 down blocks + 3 up blocks at 8x8, plus the middle block at 4x4.
    assert sorted(seen) == [4] + [8] * 5
    assert sum(isinstance(m, Block) for m in model.modules()) == len(model.blocks()) == 2 * 3 + 2 + 3 * 3


def test_residual_branches_learn_after_one_step():
    model = UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16)
    x = torch.randn(2, 3, 16, 16)
    (model(x, torch.tensor([3, 4])) - x).square().sum().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_timestep_embedding_is_the_transformer_sinusoid():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
    expected = [math.sin(7 * f) for f in freqs] + [math.cos(7 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_dropout_is_active_in_training_mode_only():
    model = UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(), resolution=16, dropout=0.5)
    for block in model.blocks():  # give the zero-initialised branches something to drop
        torch.nn.init.normal_(block.res.conv2.weight, std=0.1)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


def test_resolution_that_cannot_halve_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(ch=32, ch_mult=(1, 2, 2, 2), resolution=20)
