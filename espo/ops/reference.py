"""PyTorch reference of the fused sample-and-score op and of the ESPO stop update.

This module defines what every backend computes (any device): ``sample_reference`` takes the backends' arguments
(``espo.ops.torch_backend.sample_torch`` is the fast "torch" backend, held to it by tests/ops/test_torch_backend.py).
Semantics, row by row (x = the row's logits in float32, T its temperature, V the vocabulary size):

* ``T == 0`` is greedy: the token is the first maximal logit; the tempered policy is then a point mass,
  so ``logprobs``, ``entropy``, ``max_logprob`` and ``regret`` are exactly 0.
* Otherwise ``inv_t = fl(1 / T)`` (IEEE float32 division, as every backend does) and ``l = fl(x * inv_t)``.
  ``logprobs``, ``entropy`` and ``max_logprob`` are of the tempered distribution softmax(l) *before*
  top-k/top-p filtering (the distribution whose regret ESPO watches); ``raw_logprobs`` are of softmax(x).
  These statistics are float32 results (tolerances, not bits, between backends).
* A row is invalid when it holds a NaN or +inf logit or no finite logit at all, or when its base-2
  tempered logits ``y`` (step 1 below; ``inv_t = 1`` for greedy rows) hold a NaN or a +inf or no finite
  value: the tempering left the float32 range (``x * log2(e) / T >= 2**128``, or ``1 / T`` overflowing).
  Its token is -1, its statistics NaN, ``valid`` False, and the stop state ignores it. A ``y`` of -inf
  for a finite logit is a token of no mass, as for a logit of -inf.

Sampling is exact integer inverse-CDF, so that every backend draws *the same token* whatever the order
of its sums (float cumulative sums would put an order-dependent error band of width ~eps * Z at each of
the V token boundaries and make backends disagree on ~V * eps of the draws). ``fl`` is one IEEE float32
operation rounded to nearest (never contracted into an FMA), ``trunc`` converts toward zero:

1. Integer masses. ``a = fl(inv_t * LOG2E_F32)`` with ``LOG2E_F32 = float32(log2 e)``; per token
   ``y_i = fl(x_i * a)`` (the tempered logit in base-2 units). The vocabulary is cut into chunks of
   ``chunk_size(V)`` tokens (the Triton and CUDA kernels' partition); chunk c has the integer reference
   ``r_c = ceil(max_{i in c} y_i)`` (-inf for a chunk of -inf logits, which then has no mass) and each of
   its tokens the integer mass

       q_i = trunc(fl(exp2(fl(y_i - r_c)) * 2**S)),      S = mass_shift(V) = min(40, 62 - bit_length(V)),

   where ``exp2`` is float32 2**d: correctly rounded here (computed in float64, then rounded; so is
   the Triton kernel under the interpreter), the ``ex2.approx.ftz.f32`` instruction in both GPU kernels
   (so those two agree bit for bit). The GPU exp2 has a relative error of ~2**-22, which moves the token
   boundaries by ~sqrt(V) * 2**-22 of the mass: ~1e-4 of the draws at V = 151936 differ from this
   reference on a GPU, far fewer at small V.
2. Chunk masses in global units: ``R = max_c r_c``, ``W_c = (sum_{i in c} q_i) >> min(R - r_c, 63)``.
   Integer sums are exact in any order, and ``Z = sum_c W_c < 2**62``.
3. Target: ``target = trunc(double(u) * double(Z))`` (one IEEE float64 multiply; the int64 -> float64
   conversion rounds to nearest), with ``u`` the row's float32 uniform from ``espo.ops.philox.uniform(seed,
   offset)``, so ``0 <= target < Z``.
4. Token: the chunk is the first c whose inclusive cumulative sum of W exceeds the target; with ``t =
   target - (sum of W before c)``, the token is the first i of that chunk with ``(inclusive cumulative sum
   of q within the chunk) >> (R - r_c) > t``. That sum is monotone and ends at ``W_c > t``, so a token
   always exists, and at the first crossing the sum grew, so ``q_i > 0``: a token of zero integer mass
   is never drawn.

   Resolution: with ``n_i = q_i / 2**(R - r_c)`` (token i's mass in global units, within 1 of
   ``2**(y_i - R + S)``), token i is drawn with probability within 1/Z of ``n_i / Z``, so within 2/Z of
   its exact share, and ``Z >~ 2**(S - 1)`` (the top token alone): the probability moved by the
   quantisation is below ``2 V / Z <= V * 2**(2 - S)`` (~5.5e-7 at V = 151936, S = 40). A token with
   ``q_i == 0`` -- mass below ``2**-S`` of its chunk's reference ``2**r_c`` -- is never drawn; in the
   chunk holding the row's top token (``r_c == R``) that is every token below ``2**-S`` of the top
   token's mass. In other chunks such a token can still receive at most 1/Z by rounding the running sum.
5. Filtered rows (``0 < top_k < V`` or ``top_p < 1``, not greedy) use global masses over the whole row,
   ``qg_i = trunc(fl(exp2(fl(y_i - R)) * 2**S))`` (so a token below ``2**-S`` of the top token is never
   drawn). Top-k keeps the tokens whose logit is >= the k-th largest (ties kept). Top-p then keeps, of
   those (integer mass ``Z_k``), the tokens whose logit is >= the largest threshold x* for which the kept
   tokens with logit >= x* have integer mass >= ``need = ceil(double(top_p) * double(Z_k))`` (ties at the
   threshold kept): the smallest most-likely set reaching ``top_p`` of the mass. Both thresholds are exact
   (the kernels search an int32 order key of x: kernels/filter.py, csrc/filter.cuh). The token is then the
   first i in vocabulary order whose inclusive cumulative kept ``qg`` exceeds
   ``trunc(double(u) * double(Z_kept))``. ``top_k == 0`` or ``>= V`` and ``top_p == 1`` disable the filters.
"""
from __future__ import annotations

import torch

from .philox import uniform
from .sampling_params import SamplingParams
from .stopper import StopState

LOG2E_F32 = 1.44269502162933349609375  # float32(log2(e)), exactly
_NEG_INF = float("-inf")


def chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: about 48 chunks a row, a power of two in [16, 4096]; a function of V only.
    The same function as ``kernels/sample.py: chunk_size`` and ``csrc/sample.cuh: chunk_size``."""
    n = -(-vocab_size // 48)
    return max(16, min(4096, 1 << max(0, (n - 1).bit_length())))


def mass_shift(vocab_size: int) -> int:
    """S: a token's integer mass is below 2**S, and V * 2**S < 2**62 (the int64 row sums cannot overflow)."""
    return min(40, 62 - int(vocab_size).bit_length())


def base2_logits(x: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:
    """y = fl(x * fl(inv_t * LOG2E_F32)), float32 [B, V] (x float32 [B, V], inv_t float32 [B])."""
    a = inv_t.float() * torch.tensor(LOG2E_F32, dtype=torch.float32, device=inv_t.device)
    return x * a[:, None]


def integer_masses(y: torch.Tensor, ref: torch.Tensor, shift: int) -> torch.Tensor:
    """q = trunc(fl(exp2(fl(y - ref)) * 2**shift)) as int64, with exp2 correctly rounded to float32.

    ``ref`` broadcasts against ``y``; a reference of -inf (a chunk or row without mass) counts as 0."""
    ref = torch.where(ref == _NEG_INF, torch.zeros_like(ref), ref)
    f = (y - ref).double()
    torch.exp2(f, out=f)  # in place: the float64 temporary is the size of the logits, and the torch backend's too
    return f.float().mul_(float(2**shift)).to(torch.int64)


def _chunked(y: torch.Tensor, V: int) -> tuple[torch.Tensor, int]:
    """y [B, V] as [B, C, chunk], padded with -inf."""
    chunk = chunk_size(V)
    C = -(-V // chunk)
    pad = C * chunk - V
    if pad:
        y = torch.cat([y, y.new_full((y.shape[0], pad), _NEG_INF)], dim=1)
    return y.view(y.shape[0], C, chunk), chunk


def _row_reference(y: torch.Tensor) -> torch.Tensor:
    """R = max_c r_c = ceil(max_i y_i), float32 [B] (integer valued; -inf for a row without mass)."""
    return torch.ceil(y.max(dim=1).values)


def draw_chunked(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Steps 1-4 of the module docstring: the unfiltered integer inverse-CDF token of each row [B], from its base-2
    tempered logits ``y`` [B, V] (rows with mass) and its uniform ``u`` [B]. The torch backend draws with it too."""
    B, V = y.shape
    S = mass_shift(V)
    yc, chunk = _chunked(y, V)
    r = torch.ceil(yc.amax(dim=2))  # [B, C]
    q = integer_masses(yc, r[:, :, None], S)  # [B, C, chunk]
    R = r.amax(dim=1, keepdim=True)
    shift = torch.where(r == _NEG_INF, torch.full_like(r, 63.0), (R - r).clamp(0.0, 63.0))
    shift = torch.nan_to_num(shift, nan=63.0).to(torch.int64)
    W = q.sum(dim=2) >> shift  # [B, C]
    Z = W.sum(dim=1)
    target = (u.double() * Z.double()).to(torch.int64)
    cum = torch.cumsum(W, dim=1)
    c = (cum <= target[:, None]).sum(dim=1).clamp(max=W.shape[1] - 1)  # first chunk with cum > target
    t = target - (cum - W).gather(1, c[:, None])[:, 0]
    rows = torch.arange(B, device=y.device)
    inside = torch.cumsum(q[rows, c], dim=1) >> shift[rows, c][:, None]  # [B, chunk]
    i = (inside <= t[:, None]).sum(dim=1).clamp(max=chunk - 1)
    return (c * chunk + i).clamp(max=V - 1)


def _filter_mask(x: torch.Tensor, qg: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V]: which tokens survive top-k then top-p (thresholds on x, ties kept).

    ``qg`` are the int64 global masses of step 5 of the module docstring; top-p compares their integer
    sums with ``need = ceil(double(top_p) * double(Z_k))``."""
    B, V = x.shape
    sorted_x, order = torch.sort(x, dim=1, descending=True, stable=True)
    keep = torch.ones_like(x, dtype=torch.bool)
    k_on = (top_k > 0) & (top_k < V)
    kth = sorted_x.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    keep &= ~k_on[:, None] | (x >= kth)
    p_on = top_p < 1.0
    if bool(p_on.any()):
        # Integer masses in descending-logit order; the threshold is the logit at which the kept mass
        # reaches need (then every token with that logit is kept too).
        mass = qg.gather(1, order) * keep.gather(1, order)
        cum = torch.cumsum(mass, dim=1)
        need = torch.ceil(top_p.double() * cum[:, -1].double()).to(torch.int64)
        n = (cum < need[:, None]).sum(dim=1, keepdim=True).clamp(max=V - 1)  # first index where cum >= need
        keep &= ~p_on[:, None] | (x >= sorted_x.gather(1, n))
    return keep


def draw_filtered(x: torch.Tensor, y: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
    """Step 5: global integer masses, exact thresholds, one inverse-CDF walk over the kept tokens. ``x`` and ``y``
    are the rows' logits and base-2 tempered logits [B, V], ``top_k``/``top_p``/``u`` [B]; the torch backend draws
    its rows with top-k with it too."""
    V = x.shape[1]
    qg = integer_masses(y, _row_reference(y)[:, None], mass_shift(V))
    kept = qg * _filter_mask(x, qg, top_k, top_p)
    cum = torch.cumsum(kept, dim=1)
    target = (u.double() * cum[:, -1].double()).to(torch.int64)
    return (cum <= target[:, None]).sum(dim=1).clamp(max=V - 1)


def _has_mass(v: torch.Tensor) -> torch.Tensor:
    """Rows [B] with no NaN, no +inf and at least one finite entry."""
    return ~(torch.isnan(v) | (v == torch.inf)).any(dim=1) & (v > -torch.inf).any(dim=1)


def sample_reference(
    logits: torch.Tensor,
    params: SamplingParams,
    offset: int | torch.Tensor,
    stop: StopState | None = None,
) -> dict[str, torch.Tensor | None]:
    """The op on [B, V] logits, under the backends' contract (that of ``espo.kernels.sample.sample_triton`` and
    ``espo.ops.cuda.sample_cuda``): ``params`` for these rows (``SamplingParams.on_rows``: Python numbers or [B]
    tensors on the logits' device, float32 temperature/top_p, int64 top_k/seed) and ``offset`` (the same, int64),
    already checked; ``stop`` the stop state to update (``stop_update_reference``) or None. Returns the
    ``SampleOutput`` fields as a dict."""
    x = logits.float()
    B, V = x.shape

    def per_row(value, dtype):
        return value if isinstance(value, torch.Tensor) else torch.full((B,), value, dtype=dtype, device=x.device)

    temperature, top_p = per_row(params.temperature, torch.float32), per_row(params.top_p, torch.float32)
    top_k, seed, offset = (per_row(v, torch.int64) for v in (params.top_k, params.seed, offset))
    greedy = temperature == 0
    inv_t = (1.0 / torch.where(greedy, torch.ones_like(temperature), temperature).float()).float()
    y = base2_logits(x, inv_t)
    valid = _has_mass(x) & _has_mass(y)
    x = torch.where(valid[:, None], x, torch.zeros_like(x))
    y = torch.where(valid[:, None], y, torch.zeros_like(y))
    tempered = x * inv_t[:, None]

    # Shifted by the row max before the sum (as the kernels do), so that logits of huge magnitude keep log(V).
    l_max = tempered.max(dim=1).values
    log_s = torch.log(torch.exp(tempered - l_max[:, None]).sum(dim=1))
    logp = (tempered - l_max[:, None]) - log_s[:, None]
    p = torch.exp(logp)
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)
    x_max = x.max(dim=1).values
    raw_log_s = torch.log(torch.exp(x - x_max[:, None]).sum(dim=1))

    u = uniform(seed, offset)
    drawn = draw_chunked(y, u)
    filtered = ~greedy & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))
    if bool(filtered.any()):
        drawn = torch.where(filtered, draw_filtered(x, y, top_k, top_p, u), drawn)
    argmax = torch.argmax((x == x.max(dim=1, keepdim=True).values).int(), dim=1)
    tokens = torch.where(greedy, argmax, drawn)

    l_tok = tempered.gather(1, tokens[:, None])[:, 0]
    zero = torch.zeros_like(l_tok)
    out = {
        "tokens": tokens,
        "logprobs": torch.where(greedy, zero, (l_tok - l_max) - log_s),
        "raw_logprobs": (x.gather(1, tokens[:, None])[:, 0] - x_max) - raw_log_s,
        "entropy": torch.where(greedy, zero, entropy),
        "max_logprob": torch.where(greedy, zero, -log_s),
        "regret": torch.where(greedy, zero, l_max - l_tok),
    }
    nan = torch.full_like(l_tok, torch.nan)
    out = {k: torch.where(valid, v, torch.full_like(v, -1) if k == "tokens" else nan) for k, v in out.items()}
    out["valid"] = valid
    out["stop"] = None if stop is None else stop_update_reference(out["regret"], out["valid"], stop)
    return out


@torch.no_grad()  # the stop state never joins an autograd graph (logits that require grad would grow it forever)
def stop_update_reference(regret: torch.Tensor, valid: torch.Tensor, state: StopState) -> torch.Tensor:
    """One ESPO step on the stop state, in place; returns the stop mask [B].

    ``regret`` and ``valid`` [B] are the sampled rows'; logits row i updates stopper row ``state.rows[i]``
    (row i when ``rows`` is None). A stopped row changes no more; an invalid row's step is not counted but
    still advances its position.
    """
    fields = ("z", "sum_g", "sum_g2", "count", "position", "stopped")
    rows = {k: getattr(state, k) if state.rows is None else getattr(state, k)[state.rows] for k in fields}
    mean, var, beta, armed, ready = state.scalars.unbind()
    live = ~rows["stopped"]
    counted = live & valid
    g = torch.where(counted, regret, torch.zeros_like(regret))
    g_norm = ((g - mean) / torch.sqrt(var + state.delta)).clamp(-state.clip, state.clip)
    z = state.alpha_s * rows["z"] + (1.0 - state.alpha_s) * g_norm
    t = rows["position"]
    floor = state.value_floor
    v = torch.full_like(regret, floor) if state.values is None else state.values.float()
    v = torch.where(torch.isfinite(v), v, torch.full_like(v, floor))  # an unknown value counts as the floor
    threshold = beta * torch.clamp(v, min=floor)
    stop = counted & (armed > 0) & (ready > 0) & (t >= state.min_tokens) & (z > threshold)

    rows["z"].copy_(torch.where(counted, z, rows["z"]))
    rows["sum_g"].add_(g)
    rows["sum_g2"].add_(g * g)
    rows["count"].add_(counted.to(rows["count"].dtype))
    rows["position"].add_(live.to(rows["position"].dtype))
    rows["stopped"].logical_or_(stop)
    if state.rows is not None:
        for k, v in rows.items():
            getattr(state, k)[state.rows] = v
    return rows["stopped"].clone()

