"""The "torch" backend of ``espo.sample``: ``espo.ops.reference``'s tokens, bit for bit, in fewer passes.

The reference is written to read as the definition; this module computes the same tokens for the CPU (and any
device without the Triton or CUDA kernels), where each pass over the [B, V] logits is what costs:

* validity from the row maxima (a NaN or +inf propagates into ``max``; a row of -inf has max -inf), instead of
  four passes per tensor, and logits are zeroed only in the rare batch that holds an invalid row;
* each row's token is drawn once, by the rule its row needs (the unfiltered chunked walk, or the top-p walk),
  instead of drawing every row both ways and picking one;
* top-p (without top-k) finds its threshold among the ``m`` largest logits (``torch.topk``, m growing until
  their mass reaches top_p) instead of sorting the whole vocabulary. The threshold is the same logit: tokens
  with equal logits have equal integer masses, so the cumulative masses in descending order do not depend on
  how ties are ordered. Rows that also use top-k take the reference's sort;
* entropy from one exponential (``log s - sum(e * d) / s``), and the raw log-normaliser reused at T = 1.

Statistics are float32 results: they match the reference within float tolerance (regret, max_logprob and
logprobs bit for bit, as the stop rule reads regret), the entropy within rounding. ``tests/ops/test_torch_backend.py``
holds this module to the reference.
"""
from __future__ import annotations

import torch

from .philox import uniform
from .reference import (
    base2_logits,
    draw_chunked,
    draw_filtered,
    integer_masses,
    mass_shift,
    stop_update_reference,
)
from .sampling_params import SamplingParams
from .stopper import StopState

_FIRST_TOP_P_CANDIDATES = 64


def _top_p_threshold(x: torch.Tensor, qg: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """The logit at which the descending cumulative integer mass first reaches ``need`` [B] (the reference's
    ``sorted_x[n]``), searched among the m largest logits with m growing fourfold."""
    V = x.shape[1]
    m = min(V, _FIRST_TOP_P_CANDIDATES)
    while True:
        top, order = torch.topk(x, m, dim=1)
        cum = torch.cumsum(qg.gather(1, order), dim=1)
        if m == V or bool((cum[:, -1] >= need).all()):
            n = (cum < need[:, None]).sum(dim=1, keepdim=True).clamp(max=m - 1)
            return top.gather(1, n)
        m = min(V, 4 * m)


def _draw_top_p(x: torch.Tensor, y: torch.Tensor, y_max: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor):
    """Step 5 of the reference for rows with top-p only: global masses, exact threshold, one walk."""
    ref = torch.ceil(y_max)[:, None]
    qg = integer_masses(y, ref, mass_shift(x.shape[1]))
    need = torch.ceil(top_p.double() * qg.sum(dim=1).double()).to(torch.int64)
    kept = torch.where(x >= _top_p_threshold(x, qg, need), qg, 0)
    cum = torch.cumsum(kept, dim=1)
    target = (u.double() * cum[:, -1].double()).to(torch.int64)
    return (cum <= target[:, None]).sum(dim=1).clamp(max=x.shape[1] - 1)


def _per_row(value, dtype: torch.dtype, B: int, device: torch.device) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.full((B,), value, dtype=dtype, device=device)


def _draw(x, y, y_max, greedy, top_k, top_p, u) -> torch.Tensor:
    """Each sampled row's token by the rule it needs; greedy rows get 0 here (the caller picks the argmax).

    ``greedy`` is a [B] mask or None (no greedy row); ``top_k`` and ``top_p`` Python numbers (one rule for every
    row, decided without touching a tensor) or [B] tensors."""
    B, V = x.shape
    if greedy is None and not isinstance(top_k, torch.Tensor) and not isinstance(top_p, torch.Tensor):
        if not 0 < top_k < V and top_p >= 1.0:
            return draw_chunked(y, u)
        k, p = _per_row(top_k, torch.int64, B, x.device), _per_row(top_p, torch.float32, B, x.device)
        return draw_filtered(x, y, k, p, u) if 0 < top_k < V else _draw_top_p(x, y, y_max, p, u)
    top_k, top_p = _per_row(top_k, torch.int64, B, x.device), _per_row(top_p, torch.float32, B, x.device)
    sampled = torch.ones(B, dtype=torch.bool, device=x.device) if greedy is None else ~greedy
    filtered = sampled & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))
    drawn = torch.zeros(B, dtype=torch.int64, device=x.device)
    for rows, draw in ((sampled & ~filtered, "chunked"), (filtered, "filtered")):
        n = int(rows.sum())
        if n == 0:
            continue
        idx = None if n == B else rows.nonzero()[:, 0]
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])
        if draw == "chunked":
            tokens = draw_chunked(pick(y), pick(u))
        elif bool(((pick(top_k) > 0) & (pick(top_k) < V)).any()):
            tokens = draw_filtered(pick(x), pick(y), pick(top_k), pick(top_p), pick(u))
        else:
            tokens = _draw_top_p(pick(x), pick(y), pick(y_max), pick(top_p), pick(u))
        if idx is None:
            return tokens
        drawn[idx] = tokens
    return drawn


@torch.no_grad()  # like the kernels: statistics of a draw, never part of a graph (the trainer rescores tokens)
def sample_torch(
    logits: torch.Tensor,
    params: SamplingParams,
    offset: int | torch.Tensor,
    stop: StopState | None = None,
) -> dict[str, torch.Tensor | None]:
    """The "torch" backend, under the backends' contract (that of ``espo.kernels.sample.sample_triton``): ``params``
    for these rows (``SamplingParams.on_rows``: Python numbers or [B] tensors on the logits' device) and ``offset``
    (the same), already checked; returns the ``SampleOutput`` fields as a dict, with ``espo.ops.reference``'s
    tokens."""
    temperature, top_k, top_p, seed = params.temperature, params.top_k, params.top_p, params.seed
    B, V = logits.shape
    device = logits.device
    x = logits.float()
    if isinstance(temperature, torch.Tensor):
        greedy = temperature == 0
        inv_t = (1.0 / torch.where(greedy, torch.ones_like(temperature), temperature).float()).float()
        all_greedy = bool(greedy.all())
        greedy = greedy if bool(greedy.any()) else None
    else:  # one temperature: the same float32 1 / T for every row, decided in Python
        all_greedy = temperature == 0
        greedy = torch.ones(B, dtype=torch.bool, device=device) if all_greedy else None
        inv_t = (1.0 / torch.full((B,), 1.0 if all_greedy else temperature, dtype=torch.float32, device=device))
    unit_temperature = not isinstance(temperature, torch.Tensor) and temperature == 1.0
    y = base2_logits(x, inv_t)
    x_max, y_max = x.amax(dim=1), y.amax(dim=1)
    valid = torch.isfinite(x_max) & torch.isfinite(y_max)  # the reference's _has_mass(x) & _has_mass(y)
    all_valid = bool(valid.all())
    if not all_valid:
        x = torch.where(valid[:, None], x, torch.zeros_like(x))
        y = torch.where(valid[:, None], y, torch.zeros_like(y))
        x_max, y_max = x.amax(dim=1), y.amax(dim=1)

    tempered = x if unit_temperature else x * inv_t[:, None]
    l_max = x_max if unit_temperature else tempered.amax(dim=1)
    d = tempered - l_max[:, None]
    e = torch.exp(d)
    s = e.sum(dim=1)
    log_s = torch.log(s)
    entropy = log_s - e.mul_(d).nan_to_num_(nan=0.0).sum(dim=1) / s  # e * d is 0 * -inf = NaN at -inf logits
    if unit_temperature:
        raw_log_s = log_s
    else:
        raw = x - x_max[:, None]
        raw_log_s = torch.log(raw.exp_().sum(dim=1))

    argmax = None if greedy is None else torch.argmax((x == x_max[:, None]).int(), dim=1)
    if all_greedy:
        tokens = argmax
    else:
        u = uniform(_per_row(seed, torch.int64, B, device), _per_row(offset, torch.int64, B, device))
        tokens = _draw(x, y, y_max, greedy, top_k, top_p, u)
        if greedy is not None:
            tokens = torch.where(greedy, argmax, tokens)

    l_tok = tempered.gather(1, tokens[:, None])[:, 0]
    out = {
        "tokens": tokens,
        "logprobs": (l_tok - l_max) - log_s,
        "raw_logprobs": (x.gather(1, tokens[:, None])[:, 0] - x_max) - raw_log_s,
        "entropy": entropy,
        "max_logprob": -log_s,
        "regret": l_max - l_tok,
    }
    if greedy is not None:  # the tempered policy of a greedy row is a point mass: its statistics are exactly 0
        zero = torch.zeros_like(l_tok)
        for k in ("logprobs", "entropy", "max_logprob", "regret"):
            out[k] = torch.where(greedy, zero, out[k])
    if not all_valid:
        nan = torch.full_like(l_tok, torch.nan)
        out = {k: torch.where(valid, v, torch.full_like(v, -1) if k == "tokens" else nan) for k, v in out.items()}
    out["valid"] = valid
    out["stop"] = None if stop is None else stop_update_reference(out["regret"], out["valid"], stop)
    return out

