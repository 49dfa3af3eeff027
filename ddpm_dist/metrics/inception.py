"""The FID Inception-v3 (TensorFlow graph 2015-12-05) in pytorch-fid's module layout.

Module and parameter names follow torchvision's Inception3 with pytorch-fid's FID patches,
so the published state dict `pt_inception-2015-12-05-6726825d.pth` loads strictly as is.
The TF graph differs from torchvision's Inception in three places, kept here:
  * every average pool in the Mixed blocks ignores padded zeros (TF "SAME" pooling),
  * the last block (Mixed_7c) pools its pool branch with a max pool, not an average,
  * the classifier has 1008 outputs (1000 ImageNet classes, a background class, 7 unused).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_dist.utils.download import download

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
# The whole file's sha256 (its first 8 digits are the name's, as torch.hub names files).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURE_DIM = 2048
NUM_LOGITS = 1008
# Stated next to every number we report: FID of the same images differs between pipelines
# (resize filter, weights, precision) by more than the gaps between published models.
PIPELINE = ("pytorch-fid: Inception 2015-12-05 pool3; bilinear resize to 299 "
            "(align_corners=False); [0,1]->[-1,1]; float64 statistics, ddof=1")


class ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, TF's value) → ReLU: torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _row(cin, cout, k):
    """A 1×k convolution with 'same' padding (the factorised n×n convolutions)."""
    return ConvBN(cin, cout, (1, k), padding=(0, k // 2))


def _col(cin, cout, k):
    """A k×1 convolution with 'same' padding."""
    return ConvBN(cin, cout, (k, 1), padding=(k // 2, 0))


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def _tf_avg_pool(x):
    # TF's average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pool branches (Mixed_5b/5c/5d)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_tf_avg_pool(x)),
        ], dim=1)


class ReductionB(nn.Module):
    """35×35 → 17×17 grid reduction (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class MixedC(nn.Module):
    """17×17 block with 7×7 convolutions factorised into 1×7 and 7×1 (Mixed_6b..6e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = _row(c7, c7, 7)
        self.branch7x7_3 = _col(c7, 192, 7)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _col(c7, c7, 7)
        self.branch7x7dbl_3 = _row(c7, c7, 7)
        self.branch7x7dbl_4 = _col(c7, c7, 7)
        self.branch7x7dbl_5 = _row(c7, 192, 7)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        double = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, *double),
            self.branch_pool(_tf_avg_pool(x)),
        ], dim=1)


class ReductionD(nn.Module):
    """17×17 → 8×8 grid reduction (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _row(192, 192, 7)
        self.branch7x7x3_3 = _col(192, 192, 7)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, *seven),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class MixedE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs (Mixed_7b: average pool, Mixed_7c: max pool)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = _row(384, 384, 3)
        self.branch3x3_2b = _col(384, 384, 3)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _row(384, 384, 3)
        self.branch3x3dbl_3b = _col(384, 384, 3)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        # The TF graph max-pools in its last block (pytorch-fid's FIDInceptionE_2).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """images in [0, 1], [N, 3, H, W] → (pool3 features [N, 2048], logits [N, 1008])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, c7=128)
        self.Mixed_6c = MixedC(768, c7=160)
        self.Mixed_6d = MixedC(768, c7=160)
        self.Mixed_6e = MixedC(768, c7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, images):
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        x = preprocess(images)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        features = x.mean(dim=(2, 3))  # pool3: global average pool over the 8×8 grid
        # IS logits as in OpenAI's improved-gan code: pool3 times the softmax weights, no
        # bias, softmax later over all 1008 outputs (torch-fidelity's "logits_unbiased").
        logits = features @ self.fc.weight.T
        return features, logits


def preprocess(images):
    """pytorch-fid's input pipeline: bilinear resize to 299 (no antialias) → [-1, 1]."""
    x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


def load_inception(weights=None, device="cpu", *, allow_download=True) -> FIDInceptionV3:
    """The network with the published weights, in eval mode, frozen."""
    path = resolve_weights(weights, allow_download=allow_download)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = FIDInceptionV3()
        model.load_state_dict(state, strict=True)
    except Exception as err:  # unpickling or key/shape mismatch: both mean "wrong file"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a pytorch-fid Inception state dict ({first_line})") from err
    return model.eval().requires_grad_(False).to(device)


def default_weights_path() -> Path:
    """Where the weights are cached: torch.hub's checkpoint folder ($TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(weights=None, *, allow_download=True) -> Path:
    """The given file, else the cached one, else a one-time download; clear error offline."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights file not found: {weights}")
        return Path(weights)
    cached = default_weights_path()
    if cached.is_file():
        return cached
    reason = "downloads disabled"
    if allow_download:
        try:
            download(WEIGHTS_URL, cached, WEIGHTS_SHA256)
            return cached
        except OSError as err:  # URLError and timeouts are OSErrors
            reason = f"download failed: {err}"
    raise FileNotFoundError(
        f"Inception weights missing ({reason}): provide {WEIGHTS_FILE} with "
        f"--inception-weights FILE or place it at {cached} (published at {WEIGHTS_URL})")
