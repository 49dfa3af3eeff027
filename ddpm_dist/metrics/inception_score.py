"""Inception Score (Salimans et al. 2016) with 10 splits, from streaming per-split sums.

For split k: IS_k = exp(E_x KL(p(y|x) ‖ p(y))) = exp(E_x[Σ p log p] − Σ p̄ log p̄), with
p̄ = E_x p(y|x). So each split needs only Σ_x p(y|x), Σ_x Σ_y p log p and a count, which
all-reduce across ranks like the FID sums. Splits are the contiguous index ranges of the
OpenAI reference (improved-gan), so the score does not depend on how ranks share work.
Probabilities are the softmax over all 1008 logits, as in that reference (no fc bias).
"""
from __future__ import annotations

import numpy as np
import torch

from ddpm_dist.distributed import all_reduce_sum


def split_of(indices: torch.Tensor, total: int, splits: int = 10) -> torch.Tensor:
    """Split of each global sample index: split k holds [k·N//s, (k+1)·N//s)."""
    if total < splits:
        raise ValueError(f"Inception Score with {splits} splits needs ≥ {splits} images")
    bounds = torch.arange(splits + 1, dtype=torch.long) * total // splits
    return torch.searchsorted(bounds, indices.long().cpu(), right=True) - 1


class InceptionScoreStats:
    """Per-split Σp(y|x), Σ Σ_y p log p and counts, in float64."""

    def __init__(self, num_classes: int = 1008, splits: int = 10, device="cpu"):
        kw = dict(dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(splits, num_classes, **kw)
        self.plogp_sum = torch.zeros(splits, **kw)
        self.count = torch.zeros(splits, **kw)

    def update(self, logits: torch.Tensor, split_ids: torch.Tensor) -> None:
        assert logits.ndim == 2 and logits.shape[0] == split_ids.shape[0], logits.shape
        log_p = torch.log_softmax(logits.to(self.count.device, torch.float64), dim=1)
        p = log_p.exp()
        ids = split_ids.to(self.count.device)
        self.prob_sum.index_add_(0, ids, p)
        self.plogp_sum.index_add_(0, ids, (p * log_p).sum(dim=1))
        self.count.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    def all_reduce(self) -> None:
        all_reduce_sum([self.prob_sum, self.plogp_sum, self.count])

    def score(self) -> tuple[float, float]:
        """Mean and standard deviation (ddof=0, as the reference) over the splits."""
        if (self.count == 0).any():
            raise ValueError("Inception Score: a split received no images")
        p_y = self.prob_sum / self.count[:, None]
        mean_kl = self.plogp_sum / self.count - torch.xlogy(p_y, p_y).sum(dim=1)
        scores = torch.exp(mean_kl).cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))
