"""The PPO objective: clipped policy loss, (optionally clipped) value loss, KL penalty to a reference.

All take [B, T] token tensors and a mask, and average over the batch's real tokens.
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, to minimise; also returns the clip fraction and the approximate KL."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": float(masked_mean(((ratio - 1.0).abs() > clip).float(), mask)),
            "approx_kl": float(masked_mean((ratio - 1.0) - log_ratio, mask)),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, old_values: torch.Tensor | None = None,
    clip: float | None = None
) -> torch.Tensor:
    """Half the squared error to the returns; with ``clip``, PPO's pessimistic clipped variant."""
    err = (values - returns) ** 2
    if clip is not None and old_values is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) on the sampled tokens: unbiased and always >= 0."""
    log_ratio = ref_logprobs - logprobs
    return masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)
