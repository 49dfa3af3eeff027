"""The DDPM U-Net (Ho et al. 2020, Appendix B; `diffusion_tf/models/unet.py` of the original code).

A PixelCNN++-style U-Net: Wide-ResNet blocks with GroupNorm(32, eps=1e-6) and swish, the
sinusoidal timestep embedding added inside every block, single-head self-attention at the
listed resolutions, stride-2 conv downsampling and nearest-neighbour upsampling + conv.
Initialisation follows the original code: Xavier-uniform (fan_avg) weights, zero biases,
and zero weights for the last conv of each block, the attention output and the final conv,
so every residual branch starts as the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer timesteps (paper §4, "Transformer sinusoidal
    position embedding"): [sin(t·f_i), cos(t·f_i)] with f_i = 10000^(-i/(dim/2 - 1))."""
    assert t.ndim == 1, f"timesteps must be [B], got {tuple(t.shape)}"
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


def _init(module: nn.Module, zero: bool = False) -> nn.Module:
    """The original code's default_init: variance scaling, fan_avg, uniform (= Xavier uniform);
    scale 0 (here: exact zeros) for layers that close a residual branch."""
    if zero:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def conv3x3(c_in: int, c_out: int, zero: bool = False) -> nn.Conv2d:
    return _init(nn.Conv2d(c_in, c_out, 3, padding=1), zero)


def conv1x1(c_in: int, c_out: int, zero: bool = False) -> nn.Conv2d:
    return _init(nn.Conv2d(c_in, c_out, 1), zero)


class ResBlock(nn.Module):
    """Wide-ResNet block with the time embedding added after the first conv (unet.py:resnet_block)."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.temb_proj = _init(nn.Linear(temb_ch, c_out))
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out, zero=True)
        # The original code's "nin" shortcut: a 1x1 projection when the width changes.
        self.shortcut = conv1x1(c_in, c_out) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (unet.py:attn_block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = conv1x1(channels, channels)
        self.k = conv1x1(channels, channels)
        self.v = conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1 head, HW, C]; SDPA scales by C^-1/2 as the original does.
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Block(nn.Module):
    """A residual block, followed by attention at the resolutions that have it. The unit that
    FSDP shards and activation checkpointing wraps."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(c_in, c_out, temb_ch, dropout)
        self.attn = AttnBlock(c_out) if attn else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, temb)
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF "SAME" padding (pad right/bottom only), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, stride=2)) if with_conv else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # temb is unused; the argument keeps one call signature for every down-path layer.
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class UNet(nn.Module):
    """The paper's ε-prediction network. `forward(x, t)`: x [B, in_channels, R, R], t LongTensor [B]."""

    def __init__(self, ch: int = 128, out_ch: int = 3, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions=(16,), dropout: float = 0.1, resamp_with_conv: bool = True,
                 in_channels: int = 3, resolution: int = 32):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(ch_mult) - 1} "
                             f"(one halving per ch_mult level after the first)")
        self.ch, self.in_channels, self.resolution = ch, in_channels, resolution
        temb_ch = 4 * ch
        self.temb = nn.Sequential(_init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch)))
        self.conv_in = conv3x3(in_channels, ch)

        self.down = nn.ModuleList()
        skip_chs, c, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(Block(c, ch * mult, temb_ch, dropout, attn=res in attn_resolutions))
                c = ch * mult
                skip_chs.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(c, resamp_with_conv))
                res //= 2
                skip_chs.append(c)

        self.mid = nn.ModuleList([Block(c, c, temb_ch, dropout, attn=True), Block(c, c, temb_ch, dropout, attn=False)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(Block(c + skip_chs.pop(), ch * mult, temb_ch, dropout, attn=res in attn_resolutions))
                c = ch * mult
            if level != 0:
                self.up.append(Upsample(c, resamp_with_conv))
                res *= 2

        self.norm_out = _norm(c)
        self.conv_out = conv3x3(c, out_ch, zero=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (self.in_channels, self.resolution, self.resolution), \
            f"expected input [B, {self.in_channels}, {self.resolution}, {self.resolution}], got {tuple(x.shape)}"
        assert t.shape == (x.shape[0],), f"expected timesteps [{x.shape[0]}], got {tuple(t.shape)}"
        # The sinusoids are computed in float32 and enter the time MLP in the input's dtype, so a
        # bf16 copy of the network runs without autocast (a no-op for float32 inputs).
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer(hs[-1], temb))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), temb) if isinstance(layer, Block) else layer(h)
        assert not hs, "every skip connection must be consumed"
        return self.conv_out(F.silu(self.norm_out(h)))

    def blocks(self) -> list[nn.Module]:
        """The residual(+attention) blocks, in forward order: the units to shard or checkpoint."""
        return [m for m in self.modules() if isinstance(m, Block)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
