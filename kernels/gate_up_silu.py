"""``silu(x @ gate^T) * (x @ up^T)``: a gated MLP's two projections and its activation in one launch, for the few
rows of a decode step (``espo.engine.fused_ops.gate_up_silu``).

Each program computes a [BLOCK_M, BLOCK_N] tile of both projections, reading each weight once as the two GEMMs
would, with float32 accumulation (IEEE products for float32 weights, no TF32: torch's default); each tile is
rounded to the dtype as ``nn.Linear`` returns it, then ``silu_mul``'s arithmetic runs on it (kernels/silu_mul.py).
So the result is ``silu_mul(gate_proj(x), up_proj(x))`` wherever the two float32 sums round alike: they are summed
in another order than cuBLAS's, which moves a bf16 result by an ulp now and then.
"""
import functools

import torch
import triton
import triton.language as tl
import triton.testing

from .fused_math import exp_f32, round_to, widen

MAX_ROWS = 64  # rows of x the kernel takes (one row block): a decode step's; more rows are better served by cuBLAS
# (BLOCK_N, BLOCK_K, num_stages, num_warps) that the autotuner times on a GPU, per row block and weight shape: few,
# as each costs a compile; narrow tiles give the skinny GEMMs of a decode step enough programs (N / BLOCK_N)
CONFIGS = [(32, 64, 3, 4), (64, 64, 3, 4), (32, 128, 3, 4), (64, 128, 4, 4)]


@triton.jit
def gate_up_silu_kernel(x_ptr, wg_ptr, wu_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        w_at = rn[None, :].to(tl.int64) * stride_wn + kk[:, None]  # [BLOCK_K, BLOCK_N]: the weights' rows as columns
        w_mask = (rn[None, :] < N) & (kk[:, None] < K)
        wg = tl.load(wg_ptr + w_at, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + w_at, mask=w_mask, other=0.0)
        if INTERPRET:  # the interpreter's dot misreads bf16: products of widened values are the same, exactly
            x, wg, wu = widen(x, INTERPRET), widen(wg, INTERPRET), widen(wu, INTERPRET)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
    dt = out_ptr.dtype.element_ty
    g = widen(round_to(acc_g, dt, INTERPRET), INTERPRET)
    u = widen(round_to(acc_u, dt, INTERPRET), INTERPRET)
    act = widen(round_to(tl.div_rn(g, 1.0 + exp_f32(-g, INTERPRET)), dt, INTERPRET), INTERPRET)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], round_to(act * u, dt, INTERPRET),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.lru_cache(maxsize=None)
def _tuned():
    """The kernel autotuned over ``CONFIGS`` on a GPU, per row block, weight shape and dtype (the first call of each
    compiles and times every configuration; a decoder's happens in its warm-up forwards, before graph capture)."""
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w) for n, k, s, w in CONFIGS]

    def bench(fn, quantiles=None):
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    return triton.autotune(configs, key=["N", "K", "BLOCK_M"], do_bench=bench)(gate_up_silu_kernel)


def gate_up_silu_rows(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, last dim contiguous), gate_weight and up_weight [N, K] contiguous, one dtype (checked
    by the caller): silu(x @ gate_weight^T) * (x @ up_weight^T), [M, N]."""
    M, K = x.shape
    N = gate_weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    block_m = max(16, triton.next_power_of_2(M))  # tl.dot's smallest tile
    # IEEE float32 products (torch's default for float32 weights; the interpreter's widened bf16/fp16 too); the
    # setting does not apply to bf16/fp16 operands on a GPU
    precision = "ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32"
    args = (x, gate_weight, up_weight, out, M, N, K, x.stride(0), gate_weight.stride(0), out.stride(0))
    if x.is_cuda:
        _tuned()[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), 1)](
            *args, BLOCK_M=block_m, PRECISION=precision, INTERPRET=False, enable_fp_fusion=False)
    else:  # the interpreter: one configuration (the autotuner would time them all)
        gate_up_silu_kernel[(triton.cdiv(N, 32), 1)](*args, BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=64,
                                                     PRECISION=precision, INTERPRET=True)
    return out
