"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one, and check the PTX.

The interpreter that runs the kernels on the CPU accepts code that the GPU compiler refuses (module
globals inside @jit code, for one), so CI compiles every kernel variant for real as well. The sampling
kernels' PTX must exponentiate with ex2.approx.ftz (the instruction the CUDA backend uses, for identical
tokens) and hold no fused multiply-add (the integer sampling rule fixes every rounding). The decoder's fused
ops (espo.kernels.rms_norm with and without its residual, rope, silu_mul, gate_up_silu in each of its autotuner's
configurations, rope_decode_attention with and without a window) are only compiled, in every dtype.

    python scripts/check_triton_compile.py        # exits non-zero on a compile error or a PTX check
"""
import os
import re
import sys
from itertools import product
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("check_triton_compile: unset TRITON_INTERPRET; it needs the real compiler")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import espo.kernels.gate_up_silu as gate_up_silu  # noqa: E402
import espo.kernels.rms_norm as rms_norm  # noqa: E402
import espo.kernels.rope as rope  # noqa: E402
import espo.kernels.rope_decode_attention as rope_decode_attention  # noqa: E402
import espo.kernels.sample as K  # noqa: E402
import espo.kernels.silu_mul as silu_mul  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TWO_S = float(2**40)


def compile_ptx(fn, types: dict, constexprs: dict, **options) -> str:
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET,
                            options=dict(enable_fp_fusion=False, **options))
    return kernel.asm["ptx"]


def check(name: str, ptx: str) -> None:
    fma = len(re.findall(r"\bfma\.rn\.f32", ptx))
    ex2 = ptx.count("ex2.approx.ftz.f32")
    print(f"check_triton_compile: {name}: {ex2} ex2.approx.ftz, {fma} fma")
    if fma or not ex2:
        sys.exit(f"check_triton_compile: {name}: expected ex2.approx.ftz and no fma.rn.f32")


def main() -> None:
    for dtype, need_raw in product(("bf16", "fp32"), (False, True)):
        types = dict(logits_ptr=f"*{dtype}", temp_ptr="*fp32", temp_scalar="fp32", part_ptr="*fp32", q_ptr="*i64",
                     idx_ptr="*i32")
        flags = dict(CHUNK=4096, TEMP_PER_ROW=need_raw, NEED_RAW=need_raw, MAY_BE_GREEDY=need_raw, TWO_S=TWO_S,
                     INTERPRET=False)
        check(f"stats {dtype} raw={need_raw}", compile_ptx(K._chunk_stats_kernel, types, flags))
    types = dict(
        logits_ptr="*bf16", part_ptr="*fp32", q_ptr="*i64", idx_ptr="*i32", temp_ptr="*fp32", temp_scalar="fp32",
        topk_ptr="*i64", topk_scalar="i64", topp_ptr="*fp32", topp_scalar="fp32", seed_ptr="*i64", seed_scalar="i64",
        offset_ptr="*i64", offset_scalar="i64", tokens_ptr="*i64", logp_ptr="*fp32", raw_logp_ptr="*fp32",
        entropy_ptr="*fp32", max_logp_ptr="*fp32", regret_ptr="*fp32", valid_ptr="*i1", z_ptr="*fp32",
        sum_g_ptr="*fp32", sum_g2_ptr="*fp32", count_ptr="*i32", position_ptr="*i32", stopped_ptr="*i1",
        scalars_ptr="*fp32", stopper_rows_ptr="*i64", values_ptr="*fp32", stop_ptr="*i1", cand_ptr="*i32",
        piv_ptr="*i64", alpha_s="fp32",
        one_minus_alpha_s="fp32", clip="fp32", delta="fp32", value_floor="fp32",
    )
    for everything in (False, True):
        flags = dict(CHUNK=4096, C_BLOCK=64, ROW_BLOCK=4096, PASS_BLOCK=256, PIVOTS=K._PIVOTS,
                     CAND=K.CANDIDATES["gpu"], TWO_S=TWO_S, INTERPRET=False, **{
            k: everything for k in ("TEMP_PER_ROW", "TOPK_PER_ROW", "TOPP_PER_ROW", "SEED_PER_ROW", "OFFSET_PER_ROW",
                                    "NEED_RAW", "MAY_BE_GREEDY", "FILTER", "STOPPER", "HAS_VALUES",
                                    "HAS_STOPPER_ROWS")})
        check(f"finish all-flags={everything}", compile_ptx(K._finish_kernel, types, flags))
    pivot_types = {n: types[n] for n in ("logits_ptr", "part_ptr", "temp_ptr", "temp_scalar", "topk_ptr", "topk_scalar",
                                         "topp_ptr", "topp_scalar")}
    pivot_types.update(prev_cnt_ptr="*i64", prev_mass_ptr="*i64", cnt_ptr="*i64", mass_ptr="*i64")
    for per_row, rnd in product((False, True), (1, 2)):
        flags = dict(CHUNK=4096, C_BLOCK=64, P=K._PIVOTS, BLOCK=256, CAND=K.CANDIDATES["gpu"], ROUND=rnd,
                     TEMP_PER_ROW=per_row, TOPK_PER_ROW=per_row, TOPP_PER_ROW=per_row, TWO_S=TWO_S, INTERPRET=False)
        check(f"pivot stats round {rnd} per-row={per_row}", compile_ptx(K.pivot_stats_kernel, pivot_types, flags))
    fused_ops()
    print("check_triton_compile: ok")


def fused_ops() -> None:
    """The decoder's fused-op kernels, compiled in each dtype at the 0.5B model's shapes (no PTX checks)."""
    for dtype in ("fp32", "bf16", "fp16"):
        rms = dict(x_ptr=f"*{dtype}", res_ptr=f"*{dtype}", sum_ptr=f"*{dtype}", w_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                   n_cols_f="fp32", eps="fp32")
        rope_types = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "q_out_ptr",
                                               "k_out_ptr", "k_cache_ptr", "v_cache_ptr")} | {"rows_ptr": "*i64"}
        compiled = [
            (f"rms_norm {dtype} hidden", rms_norm.rms_norm_kernel, rms, dict(BLOCK=1024, HAS_RESIDUAL=False)),
            (f"add_rms_norm {dtype} hidden", rms_norm.rms_norm_kernel, rms, dict(BLOCK=1024, HAS_RESIDUAL=True)),
            (f"rms_norm {dtype} head (Qwen3 q/k norm)", rms_norm.rms_norm_kernel, rms,
             dict(BLOCK=128, HAS_RESIDUAL=False)),
            *((f"rope {dtype}{' with its cache write' if cache else ''}", rope.rope_kernel, rope_types,
               dict(BLOCK_D=64, BLOCK_QH=16, BLOCK_KH=2, CACHE=cache)) for cache in (False, True)),
            (f"silu_mul {dtype}", silu_mul.silu_mul_kernel, dict(gate_ptr=f"*{dtype}", up_ptr=f"*{dtype}",
             out_ptr=f"*{dtype}"), dict(BLOCK=silu_mul.BLOCK)),
            *((f"rope_decode_attention {dtype}{' with a window' if window else ''}",
               rope_decode_attention.rope_decode_attention_kernel,
               {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "k_cache_ptr", "v_cache_ptr",
                                         "out_ptr")} | {"seqlens_ptr": "*i64", "scale_log2": "fp32"},
               dict(GROUP=7, BLOCK_G=16, BLOCK_D=64, BLOCK_N=32, HAS_WINDOW=window)) for window in (False, True)),
        ]
        for name, fn, types, flags in compiled:
            ptx = compile_ptx(fn, types, dict(flags, INTERPRET=False))
            print(f"check_triton_compile: {name}: {len(ptx)} bytes of PTX")
        gus = dict(x_ptr=f"*{dtype}", wg_ptr=f"*{dtype}", wu_ptr=f"*{dtype}", out_ptr=f"*{dtype}")
        for (n, k, stages, warps), rows in product(gate_up_silu.CONFIGS, (16, 64)):
            flags = dict(BLOCK_M=rows, BLOCK_N=n, BLOCK_K=k, PRECISION="ieee" if dtype == "fp32" else "tf32",
                         INTERPRET=False)
            ptx = compile_ptx(gate_up_silu.gate_up_silu_kernel, gus, flags, num_stages=stages, num_warps=warps)
            print(f"check_triton_compile: gate_up_silu {dtype} {rows}x{n}x{k}, {stages} stages: {len(ptx)} bytes")
    rms_bf16_f32_weight = dict(x_ptr="*bf16", res_ptr="*bf16", sum_ptr="*bf16", w_ptr="*fp32", out_ptr="*fp32",
                               n_cols_f="fp32", eps="fp32")
    compile_ptx(rms_norm.rms_norm_kernel, rms_bf16_f32_weight, dict(BLOCK=1024, HAS_RESIDUAL=True, INTERPRET=False))
    print("check_triton_compile: rms_norm bf16 with a float32 weight: compiled")


if __name__ == "__main__":
    main()
