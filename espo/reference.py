"""PyTorch reference of the fused sample-and-score op and of the ESPO stop update.

This module defines what every backend computes (float32 math, any device). It is also the "torch"
backend. Semantics, row by row (x = the row's logits, T its temperature):

* ``T == 0`` is greedy: the token is the first maximal logit; the tempered policy is then a point mass,
  so ``logprobs``, ``entropy``, ``max_logprob`` and ``regret`` are exactly 0.
* Otherwise ``l = x * (1 / T)`` (the reciprocal in float32, as the kernels do); ``logprobs``, ``entropy``
  and ``max_logprob`` are of the tempered distribution softmax(l) *before* top-k/top-p filtering (the
  distribution whose regret ESPO watches); ``raw_logprobs`` are of softmax(x).
* Filtering: top-k keeps the tokens whose logit is >= the k-th largest (ties kept); then top-p keeps, of
  those, the smallest set of most likely tokens whose renormalised mass reaches ``top_p`` (again with
  ties at the threshold kept). ``top_k == 0`` or ``>= V`` and ``top_p == 1`` disable them.
* Sampling is inverse-CDF with one uniform ``u`` per row from ``espo.rng.uniform(seed, offset)``: the
  token is the first index, in vocabulary order, whose cumulative kept mass exceeds ``u`` times the total.
* A row is invalid when it holds a NaN or +inf logit or no finite logit at all: its token is -1, its
  statistics NaN, ``valid`` False, and the stop state ignores it.
"""
from __future__ import annotations

import torch

from .rng import uniform


def _filter_mask(x: torch.Tensor, l: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V]: which tokens survive top-k then top-p (thresholds on x, ties kept)."""
    B, V = x.shape
    sorted_x, order = torch.sort(x, dim=1, descending=True, stable=True)
    keep = torch.ones_like(x, dtype=torch.bool)
    k_on = (top_k > 0) & (top_k < V)
    kth = sorted_x.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    keep &= ~k_on[:, None] | (x >= kth)
    p_on = top_p < 1.0
    if bool(p_on.any()):
        # Masses in descending-logit order; the threshold is the logit at which the kept mass reaches top_p.
        mass = torch.exp(l.gather(1, order) - l.max(dim=1, keepdim=True).values) * keep.gather(1, order)
        cum = torch.cumsum(mass.double(), dim=1)
        need = top_p.double()[:, None] * cum[:, -1:]
        n = (cum < need).sum(dim=1, keepdim=True).clamp(max=V - 1)  # first index where cum >= need
        keep &= ~p_on[:, None] | (x >= sorted_x.gather(1, n))
    return keep


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The op on [B, V] logits with per-row float32 temperature/top_p and int64 top_k/seed/offset."""
    x = logits.float()
    B, V = x.shape
    valid = ~(torch.isnan(x) | (x == torch.inf)).any(dim=1) & (x > -torch.inf).any(dim=1)
    x = torch.where(valid[:, None], x, torch.zeros_like(x))
    greedy = temperature == 0
    inv_t = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature).float()
    l = x * inv_t[:, None]

    l_max = l.max(dim=1).values
    lse = torch.logsumexp(l, dim=1)
    logp = l - lse[:, None]
    p = torch.exp(logp)
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)
    max_logprob = l_max - lse
    raw_lse = torch.logsumexp(x, dim=1)

    keep = _filter_mask(x, l, top_k, top_p)
    mass = torch.exp(l - l_max[:, None]) * keep
    cum = torch.cumsum(mass.double(), dim=1)
    target = uniform(seed, offset).double() * cum[:, -1]
    drawn = (cum <= target[:, None]).sum(dim=1)  # first index whose cumulative mass exceeds the target
    last_positive = (V - 1) - torch.argmax((mass.flip(1) > 0).int(), dim=1)
    drawn = torch.minimum(drawn, last_positive)
    argmax = torch.argmax((x == x.max(dim=1, keepdim=True).values).int(), dim=1)
    tokens = torch.where(greedy, argmax, drawn)

    l_tok = l.gather(1, tokens[:, None])[:, 0]
    zero = torch.zeros_like(l_tok)
    out = {
        "tokens": tokens,
        "logprobs": torch.where(greedy, zero, l_tok - lse),
        "raw_logprobs": x.gather(1, tokens[:, None])[:, 0] - raw_lse,
        "entropy": torch.where(greedy, zero, entropy),
        "max_logprob": torch.where(greedy, zero, max_logprob),
        "regret": torch.where(greedy, zero, l_max - l_tok),
    }
    nan = torch.full_like(l_tok, torch.nan)
    out = {k: torch.where(valid, v, torch.full_like(v, -1) if k == "tokens" else nan) for k, v in out.items()}
    out["valid"] = valid
    return out


def stop_update_reference(
    regret: torch.Tensor,
    valid: torch.Tensor,
    values: torch.Tensor | None,
    rows: dict[str, torch.Tensor],
    scalars: torch.Tensor,
    *,
    alpha_s: float,
    clip: float,
    delta: float,
    value_floor: float,
    min_tokens: int,
) -> torch.Tensor:
    """One ESPO step on the stop state, in place; returns the stop mask [B].

    ``rows`` holds the per-row state (z, sum_g, sum_g2, count, position, stopped); ``scalars`` is the
    float32 vector (mean, var, beta, armed, ready) of ``espo.EarlyStopper``. A stopped row changes no
    more; an invalid row's step is not counted but still advances its position.
    """
    mean, var, beta, armed, ready = scalars.unbind()
    live = ~rows["stopped"]
    counted = live & valid
    g = torch.where(counted, regret, torch.zeros_like(regret))
    g_norm = ((g - mean) / torch.sqrt(var + delta)).clamp(-clip, clip)
    z = alpha_s * rows["z"] + (1.0 - alpha_s) * g_norm
    t = rows["position"]
    v = torch.full_like(regret, value_floor) if values is None else values.float()
    threshold = beta * torch.clamp(v, min=value_floor)
    stop = counted & (armed > 0) & (ready > 0) & (t >= min_tokens) & (z > threshold)

    rows["z"].copy_(torch.where(counted, z, rows["z"]))
    rows["sum_g"].add_(g)
    rows["sum_g2"].add_(g * g)
    rows["count"].add_(counted.to(rows["count"].dtype))
    rows["position"].add_(live.to(rows["position"].dtype))
    rows["stopped"].logical_or_(stop)
    return rows["stopped"].clone()
