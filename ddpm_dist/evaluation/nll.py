"""Bits/dim of the variational bound (Ho et al. 2020, Eq. 5; Table 2's NLL) on a test set.

Each rank sums its images' bits/dim in float64 (`bpd_sums`: a contiguous block of the test set,
so that on shards a rank reads only the shards holding its block); the sums are all-reduced and
`bpd_means` turns them into the result. Image i's forward-process noise comes from the stream
keyed by (seed, i) (`noise.SampleNoise`), so the number does not depend on the world size.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ddpm_dist.data.batch import ImageBatch, to_model_input
from ddpm_dist.images import luma
from ddpm_dist.metrics.image_sources import ArrayImages, open_images, uint8_batches
from ddpm_dist.noise import SampleNoise


def open_test_set(data: str, resolution: int):
    """uint8 HWC images, indexable: the embedded digits, a folder or an ADM-style npz."""
    if data == "digits":
        from ddpm_dist.data.digits import load_digits_images
        return ArrayImages(load_digits_images(resolution).permute(0, 2, 3, 1).numpy(), name="digits")
    return open_images(data)


def nll_input(images: torch.Tensor, channels: int, resolution: int, device) -> torch.Tensor:
    """uint8 [B, 3, H, W] → [-1, 1] at the model's shape on `device`, as training sees data:
    the same conversion (`to_model_input`, never flipped), and for a 1-channel model the grey
    that the shard stream decodes (PIL's "L")."""
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        raise ValueError(f"test images are {tuple(images.shape[-2:])}, the model wants {resolution}²")
    if channels not in (1, 3):
        raise ValueError(f"the model has {channels} input channels; test images are grey (1) or RGB (3)")
    if channels == 1:
        images = luma(images)
    return to_model_input(ImageBatch(images, torch.zeros(len(images), dtype=torch.bool)), device)


def bpd_sums(model, diffusion, images, indices, *, seed: int, batch_size: int, device,
             show: bool = False) -> torch.Tensor:
    """float64 [count, Σ total, Σ prior, Σ L_0] of `images[indices]` (one rank's share)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    bar = tqdm(total=len(indices), unit="img", desc="bits/dim (rank 0)", disable=not show)
    for idx, batch in uint8_batches(images, indices, batch_size):
        x = nll_input(batch, model.in_channels, model.resolution, device)
        noise = SampleNoise(seed, idx.tolist(), device)
        out = diffusion.calc_bpd_loop(model, x, generator=noise)
        sums += torch.stack([out["total_bpd"].new_tensor(float(len(idx))), out["total_bpd"].sum(),
                             out["prior_bpd"].sum(), out["vb"][:, 0].sum()])
        bar.update(len(idx))
    bar.close()
    return sums


def bpd_means(sums: torch.Tensor) -> dict:
    """The result of all ranks' (all-reduced) `bpd_sums`: mean bits/dim, its prior and decoder
    terms, and the image count."""
    count, total, prior, decoder = sums.cpu().tolist()
    return {"bits_per_dim": total / count, "prior_bpd": prior / count, "decoder_bpd": decoder / count,
            "num_images": int(count)}
