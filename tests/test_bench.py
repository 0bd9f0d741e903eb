"""The benchmarks' shared helpers (bench/common.py: what a kernel is, device time by kernel) and a smoke run of
bench_decode's step breakdown on the CPU (on a GPU the same code reads CUDA kernels instead of aten ops)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import by_kind, device_times, kernel_kind

REPO = Path(__file__).resolve().parent.parent

# kernel names as torch.profiler reports them on an H100/H200 (cuBLAS, CUTLASS, SDPA's backends, espo's, torch's)
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off_kernel": "gemm",
    "nvjet_hsh_64x64_64x16_2x1_v_bz_TNT": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(T1::Params)": "gemm",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>(Flash_fwd_params)": "attention",
    "_chunk_stats_kernel": "espo sample",
    "_finish_kernel": "espo sample",
    "pivot_stats_kernel": "espo sample",
    "void espo::pivot_round_kernel<2, __nv_bfloat16>(espo::SampleParams)": "espo sample",
    "void espo::sample_kernel<__nv_bfloat16>(espo::SampleParams)": "espo sample",
    "rms_norm_kernel": "espo fused",
    "rope_kernel": "espo fused",
    "silu_mul_kernel": "espo fused",
    "gate_up_silu_kernel": "espo fused",
    "rope_decode_attention_kernel": "attention",  # RoPE and the cache write too: beside SDPA's kernel
    "void at::native::index_elementwise_kernel<128, 4, ...>": "copy",
    "Memcpy DtoD (Device -> Device)": "copy",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>": "copy",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>": "other",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MaxOps<float>, ...>>": "other",
    "aten::mm": "gemm",
    "aten::addmm": "gemm",
    "aten::add": "other",
}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_kind(name):
    assert kernel_kind(name) == NAMES[name]


def test_device_times_counts_each_op_per_call_on_the_cpu():
    a = torch.randn(32, 32)

    def step():
        return (a @ a @ a + 1).sum()

    times = device_times(step, "cpu", calls=3)
    assert times["aten::mm"]["launches"] == 2.0 and times["aten::mm"]["us"] > 0
    assert times["aten::add"]["launches"] == 1.0
    kinds = by_kind(times)
    assert kinds["gemm"]["launches"] >= 2.0
    assert kinds["all"]["launches"] == pytest.approx(sum(t["launches"] for t in times.values()))
    assert kinds["all"]["us"] == pytest.approx(sum(t["us"] for t in times.values()))


def test_bench_decode_breaks_a_step_down_by_kernel_kind():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_decode.py"), "--smoke", "--breakdown", "--no-hf",
                          "--stop-fractions", "0.5", "--batch", "4", "--overlap-steps", "both"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    stops = out.stdout.split("Early stopping", 1)[1]
    assert stops.count("| False |") == 1 and stops.count("| False, overlapped |") == 1  # a stop row each
    throughput = out.stdout.split("Throughput", 1)[1].split("Where a decode step's time goes", 1)[0]
    assert throughput.count("| False |\n") == throughput.count("| False, overlapped |\n") == 2  # --smoke: batch 1, 4
    table = out.stdout.split("Where a decode step's time goes", 1)[1].split("Early stopping", 1)[0]
    header, _, row = [line for line in table.splitlines() if line.startswith("|")][:3]
    assert "| gemm |" in header + " " and "| attention |" in header
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert float(cells["busy ms"]) > 0 and float(cells["launches"]) > 0
    assert float(cells["gemm"].split()[0]) > 0
