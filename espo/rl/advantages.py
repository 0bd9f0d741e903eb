"""Advantages for PPO (GAE) and GRPO (group-normalised rewards), vectorised over the batch.

Trajectories are right-padded rows of [B, T] tensors: ``mask[b, t]`` is 1 on the row's real tokens, which
run from t = 0 to its length - 1 with no holes. Every trajectory ends at its last real token, whatever
ended it (EOS, the length limit, or an ESPO stop): the state after it is terminal, so GAE never
bootstraps past it. An ESPO-stopped row simply carries ``r_fail`` as the reward of its last token (the
token that triggered the stop), which makes it an absorbing failure.
"""
from __future__ import annotations

import torch


def reverse_discounted_sum(x: torch.Tensor, discount: float) -> torch.Tensor:
    """y[:, t] = sum_{s >= t} discount**(s - t) * x[:, s] along the last dim, for x [B, T].

    A Hillis-Steele scan: ceil(log2 T) vectorised steps, no Python loop over time.
    """
    y = x.clone()
    T = x.shape[-1]
    shift, factor = 1, discount
    while shift < T:
        y[..., :-shift] = y[..., :-shift] + factor * y[..., shift:]
        shift, factor = shift * 2, factor * factor
    return y


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets.

    Args:
        rewards: [B, T] per-token rewards (typically 0 except at the last token).
        values: [B, T] the critic's value of the state in which each token was chosen.
        mask: [B, T] 1 on real tokens (right-padded, contiguous from t = 0).
    Returns:
        advantages [B, T] and returns (= advantages + values) [B, T], both 0 on padding.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must share one [B, T] shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    m = mask.to(values.dtype)
    next_values = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    delta = (rewards + gamma * next_values - values) * m
    # Padding carries delta = 0, so a constant discount cannot leak across a trajectory's end.
    advantages = reverse_discounted_sum(delta, gamma * lam) * m
    return advantages, (advantages + values) * m


def _stop_row_ends(
    rewards: torch.Tensor, mask: torch.Tensor, stop_index: torch.Tensor, r_fail: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, mask) of rows ended at their stops: tokens after a stop leave the mask; with ``r_fail``, the stop
    token's reward becomes ``r_fail``, and every token before it keeps its own reward."""
    stop_index = torch.as_tensor(stop_index, dtype=torch.int64, device=mask.device)
    if stop_index.shape != (mask.shape[0],):
        raise ValueError(f"stop_index must hold one int per row ({mask.shape[0]}; -1 for no stop), "
                         f"got {tuple(stop_index.shape)}")
    pos = torch.arange(mask.shape[1], device=mask.device)[None]
    stopped = (stop_index >= 0)[:, None]
    mask = mask * (~stopped | (pos <= stop_index[:, None])).to(mask.dtype)
    if r_fail is not None:
        at_stop = stopped & (pos == stop_index[:, None])
        rewards = torch.where(at_stop, torch.full_like(rewards, r_fail), rewards)
    return rewards * mask, mask


def response_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    stop_index: torch.Tensor | None = None,
    r_fail: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE over each row's response tokens, where the mask may have holes (a multi-turn loop's tool output), and
    rows may end at an ESPO stop. What ``espo.integrations.verl.espo_gae`` computes before whitening.

    On the response tokens (mask 1) it equals verl's ``compute_gae_advantage_return``: a masked token is skipped,
    so the next response token's value and advantage carry across a hole. At every masked position (holes and
    padding) it writes 0 for advantages and returns, where verl's loop leaves its running estimate; the PPO losses
    mask those positions, so training is the same.

    ``stop_index`` (int [B], -1 where a row was not stopped) ends a row at its stop: the tokens after it leave the
    mask and nothing is bootstrapped past it; with ``r_fail`` the stop token's reward becomes ``r_fail``, while
    every token before it keeps its own reward (a per-token KL penalty in the reward, say).

    Returns (advantages, returns = advantages + values, the mask after the stops), all [B, T], 0 where masked.
    """
    mask = mask.to(values.dtype)
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must share one [B, T] shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if stop_index is not None:
        rewards, mask = _stop_row_ends(rewards, mask, stop_index, r_fail)
    with torch.no_grad():
        if bool((mask[:, 1:] > mask[:, :-1]).any()):  # holes: gather each row's real tokens to its front
            order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
            adv_c, _ = gae(rewards.gather(1, order), values.gather(1, order), mask.gather(1, order),
                           gamma=gamma, lam=lam)
            advantages = torch.zeros_like(adv_c).scatter_(1, order, adv_c)
        else:
            advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=lam)
        returns = (advantages + values) * mask
    return advantages, returns, mask


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """GRPO's advantage of each rollout: its reward minus its group's mean, over the group's std.

    Args:
        rewards: [N] one scalar reward per rollout.
        group_ids: [N] int64, the prompt (group) of each rollout; groups may have different sizes.
        scale: divide by the group's (population) standard deviation + eps; False keeps the centred reward.
    Returns:
        [N] advantages; 0 for every rollout of a group whose rewards are all equal.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must be [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    ids = torch.unique(group_ids, return_inverse=True)[1]
    G = int(ids.max()) + 1 if ids.numel() else 0
    r = rewards.double()
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, ids, r) / count
    centred = r - mean[ids]
    if scale:
        var = torch.zeros_like(count).index_add_(0, ids, centred * centred) / count
        centred = centred / (var.sqrt()[ids] + eps)
    return centred.to(rewards.dtype)
