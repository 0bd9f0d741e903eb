"""The PPO update's data and passes: a step's rollouts as tensors, length-sorted micro-batches, the policy's
log-probabilities and values of them, and the backward pass of one minibatch.

Shapes: N rollouts, S = prompt + generated positions, T = generated tokens (right-padded to the longest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from espo.engine.decoder import Rollouts
from espo.engine.value_head import ValueHead

from .losses import kl_penalty, policy_loss, value_loss

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class Batch:
    """One step's rollouts as right-padded tensors (N rollouts, S sequence positions, T generated tokens)."""

    input_ids: torch.Tensor  # [N, S] prompt + generated tokens
    attention_mask: torch.Tensor  # [N, S]
    positions: torch.Tensor  # [N, T] index in input_ids of the input predicting generated token t
    tokens: torch.Tensor  # [N, T] generated tokens
    mask: torch.Tensor  # [N, T] 1 on real generated tokens
    rewards: torch.Tensor  # [N] terminal reward (task outcome, or r_fail when stopped)
    group: torch.Tensor  # [N] prompt id of each rollout
    seq_lens: torch.Tensor  # [N] prompt + generated tokens of each rollout (its real columns of input_ids)
    lengths: torch.Tensor  # [N] generated tokens of each rollout (its real columns of tokens)


@dataclass
class Targets:
    """What one step's PPO update fits: the batch, the old policy's logprobs [N, T] and values [N, T] (critic
    only), the advantages [N, T], the returns [N, T] (critic only) and the reference logprobs [N, T] (KL only)."""

    batch: Batch
    old_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    ref_logprobs: torch.Tensor | None


def build_batch(prompts: list[list[int]], rollouts: Rollouts, rewards: list[float], prompt_ids: list[int], *,
                pad_id: int, device) -> Batch:
    """The rollouts (those with at least one token) as a right-padded ``Batch`` on ``device``: ``prompts[i]`` is
    the prompt of rollouts with ``prompt_index`` i, ``prompt_ids[i]`` its id in the prompt set (the GRPO group)."""
    kept = [i for i, r in enumerate(rollouts) if r.length > 0]
    seqs = [prompts[rollouts[i].prompt_index] + rollouts[i].tokens.tolist() for i in kept]
    N, S = len(kept), max(len(s) for s in seqs)
    T = max(rollouts[i].length for i in kept)
    input_ids = torch.full((N, S), pad_id, dtype=torch.int64)
    attention = torch.zeros(N, S, dtype=torch.int64)
    positions = torch.zeros(N, T, dtype=torch.int64)
    tokens = torch.zeros(N, T, dtype=torch.int64)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for row, (i, seq) in enumerate(zip(kept, seqs)):
        r, P = rollouts[i], len(prompts[rollouts[i].prompt_index])
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        positions[row, : r.length] = torch.arange(P - 1, P - 1 + r.length)
        tokens[row, : r.length] = r.tokens
        mask[row, : r.length] = True
    return Batch(
        input_ids.to(device), attention.to(device), positions.to(device), tokens.to(device), mask.to(device),
        torch.tensor([rewards[i] for i in kept], dtype=torch.float32, device=device),
        torch.tensor([prompt_ids[rollouts[i].prompt_index] for i in kept], dtype=torch.int64, device=device),
        torch.tensor([len(seq) for seq in seqs], dtype=torch.int64, device=device),
        torch.tensor([rollouts[i].length for i in kept], dtype=torch.int64, device=device),
    )


def micro_batches(batch: Batch, rows: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """``rows`` (indices into ``batch``) cut into length-sorted groups whose padded size (rows x the group's
    longest sequence) stays within ``max_tokens``: a forward over a group pads to that group's longest row
    only, so the update's cost follows the tokens it trains on. A row longer than ``max_tokens`` is a group."""
    seq = batch.seq_lens[rows]
    order = torch.argsort(seq, stable=True)
    sorted_lens = seq[order].tolist()
    groups, start = [], 0
    for i in range(1, len(sorted_lens) + 1):
        if i == len(sorted_lens) or (i - start + 1) * sorted_lens[i] > max_tokens:
            groups.append(rows[order[start:i]])
            start = i
    return groups


@torch.no_grad()
def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean [..., V]: the smallest most-likely set of tokens whose probabilities ``probs`` [..., V] reach
    ``top_p`` of the mass, every token tied with the least likely of them included (``espo.sample``'s rule)."""
    ordered = probs.sort(dim=-1, descending=True).values
    before = ordered.cumsum(-1) - ordered  # the mass of the more likely tokens
    last_kept = (before < top_p).sum(-1, keepdim=True).clamp(min=1) - 1
    return probs >= ordered.gather(-1, last_kept)


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                     top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities [...] of ``tokens`` [...] under the distribution the rollouts were drawn from:
    ``logits`` [..., V] tempered and, with ``top_p < 1``, truncated to ``top_p_mask`` and renormalised.

    The kept set is chosen without gradient; the gradient flows through the renormalisation over it. A sampled
    token that falls outside it here (the update's forward rounds differently from the decoder's) is added to
    it, so that no log-probability is -inf."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    chosen = logp.gather(-1, tokens[..., None])[..., 0]
    if top_p >= 1.0:
        return chosen
    kept = top_p_mask(logp.detach().exp(), top_p).scatter_(-1, tokens[..., None], True)
    return chosen - torch.logsumexp(logp.masked_fill(~kept, float("-inf")), dim=-1)


def policy_forward(model, value_head: ValueHead | None, batch: Batch, temperature: float, rows: torch.Tensor,
                   top_p: float = 1.0):
    """Log-probabilities of the generated tokens [n, t] under the sampling distribution (``sampled_logprobs``)
    and, with a value head, V(s_t) [n, t], of the rollouts ``rows``; t is their longest generation (the columns
    past it are padding for all of them)."""
    S, T = int(batch.seq_lens[rows].max()), int(batch.lengths[rows].max())
    out = model(input_ids=batch.input_ids[rows, :S], attention_mask=batch.attention_mask[rows, :S],
                output_hidden_states=value_head is not None)
    pos = batch.positions[rows, :T]
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logprobs = sampled_logprobs(logits, batch.tokens[rows, :T], temperature, top_p)
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1]
        values = value_head(hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])))
    return logprobs, values


@torch.no_grad()
def score_batch(model, value_head: ValueHead | None, batch: Batch, temperature: float, max_tokens: int,
                top_p: float = 1.0):
    """``policy_forward`` over the whole batch in micro-batches: logprobs [N, T] and values [N, T] (or None)."""
    N, T = batch.mask.shape
    logprobs = torch.zeros(N, T, device=batch.mask.device)
    values = torch.zeros(N, T, device=batch.mask.device) if value_head is not None else None
    for rows in micro_batches(batch, torch.arange(N, device=batch.mask.device), max_tokens):
        lp, v = policy_forward(model, value_head, batch, temperature, rows, top_p)
        logprobs[rows, : lp.shape[1]] = lp
        if values is not None:
            values[rows, : v.shape[1]] = v
    return logprobs, values


def minibatch_backward(model, value_head: ValueHead | None, targets: Targets, rows: torch.Tensor,
                       cfg: "TrainConfig") -> dict[str, float]:
    """Backpropagate one minibatch's PPO loss (policy + vf_coef * value + kl_coef * KL, each a mean over the
    minibatch's tokens) micro-batch by micro-batch; return the loss terms and the clip statistics.

    Each micro-batch's means are weighted by its share of the minibatch's tokens, so the loss and the
    gradients are those of one forward over the whole minibatch padded to its longest row."""
    batch = targets.batch
    n_tokens = batch.mask[rows].sum().clamp(min=1)
    totals = dict.fromkeys(("policy_loss", "value_loss", "kl", "clip_fraction", "approx_kl"), 0.0)
    for g in micro_batches(batch, rows, cfg.update_tokens):
        logprobs, values = policy_forward(model, value_head, batch, cfg.temperature, g, cfg.top_p)
        t = logprobs.shape[1]
        m = batch.mask[g, :t]
        share = m.sum() / n_tokens
        loss, info = policy_loss(logprobs, targets.old_logprobs[g, :t], targets.advantages[g, :t], m, clip=cfg.clip)
        terms = {"policy_loss": loss.detach(), **info}
        if targets.returns is not None:
            terms["value_loss"] = value_loss(values, targets.returns[g, :t], m, old_values=targets.old_values[g, :t],
                                             clip=cfg.value_clip)
            loss = loss + cfg.vf_coef * terms["value_loss"]
        if targets.ref_logprobs is not None:
            terms["kl"] = kl_penalty(logprobs, targets.ref_logprobs[g, :t], m)
            loss = loss + cfg.kl_coef * terms["kl"]
        (loss * share).backward()
        w = float(share)
        for k, v in terms.items():
            totals[k] += w * float(v.detach() if isinstance(v, torch.Tensor) else v)
    return totals
