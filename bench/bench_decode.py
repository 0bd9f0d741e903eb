"""Benchmark espo.Decoder: decode throughput against transformers' generate, and what early stops save.

Models are random-initialised with the shapes of Qwen2.5-0.5B (and 1.5B) and of SmolLM2-135M-Instruct (Llama,
30 layers, 49,152-token vocabulary), in bf16 on the GPU: speed does not depend on the weights' values, and
nothing is downloaded.

1. Throughput: B prompts of --prompt-len random tokens, --new-tokens sampled tokens each (no EOS), at
   temperature 1. espo.Decoder (after a warm-up run that captures its CUDA graphs) against
   ``model.generate(do_sample=True)`` at the same batch and lengths. The decode step time is isolated as
   (t(new) - t(new/2)) / (new/2) and compared with the weight-read floor (bytes of the weights over the
   copy bandwidth measured in this run).
2. Early stopping: --rollouts-per-slot x B rollouts through B slots, without stops, then with a fraction
   of the rollouts (25%, 50%) stopped at uniformly random points. A batch ends when its last rollout
   does: once no rollout is pending, the pool drains and a step costs about the same at any batch (the
   weights are read once per step), so the time saved approaches the tokens saved as more rollouts per
   slot share the pool (4 and 16 by default: both are reported). The stops are scheduled (the rows to
   stop and where are drawn in advance) because a random model gives the ESPO rule nothing to act on;
   both runs pass an EarlyStopper, so the stop update runs in the sampling kernel for every row, and a
   scheduled stop frees its slot exactly as an ESPO stop does. Reported: the fraction of tokens saved,
   of wall-clock saved, and their ratio (target >= 0.8). --stop-lengths natural adds rows where each rollout
   ends at EOS at its own length, as in training, so that the baseline refills scattered slots too
   (bench_refill_schedule.py counts what each refill design costs in both cases).

    python bench/bench_decode.py                      # on a GPU -> bench/results/decode.{json,md}
    python bench/bench_decode.py --models 0.5b 1.5b   # and the 1.5B shape
    python bench/bench_decode.py --cpu                # the CPU rows -> bench/results/decode-cpu.{json,md}
    python bench/bench_decode.py --smoke              # tiny shapes on the CPU, to check the script runs
    python bench/bench_decode.py --batch 64 --fused-ops both --no-hf   # the step with and without fused ops
    python bench/bench_decode.py --batch 64 --breakdown   # and the step's kernels by kind (torch.profiler)
    python bench/bench_decode.py --overlap-steps both     # steps launched before the last one is read, and not
    python bench/bench_decode.py --fused-ops on --rope-decode-attention both   # RoPE + attention in one launch, or not
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import by_kind, device_times, environment, write_report  # first: puts this checkout's espo first

import espo  # noqa: E402
from espo.engine import fused_ops  # noqa: E402
from espo.engine.decoder import Decoder  # noqa: E402
from espo.engine.scheduler import Scheduler  # noqa: E402
from espo.engine.sequence import CODE_EOS, CODE_STOP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    # Qwen2.5-0.5B / 1.5B (config.json of the released checkpoints), tied embeddings
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    # SmolLM2-135M-Instruct (its config.json): Llama, tied embeddings
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    # the CPU rows: a 4-layer, 256-wide model with a 32k vocabulary, in float32
    "cpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2),
}
VOCAB = {"smoke": 256, "cpu": 32000, "smollm2": 49152}


def build_model(shape: str, device: str, dtype: torch.dtype):
    import transformers as T

    vocab = VOCAB.get(shape, 151936)
    llama = shape == "smollm2"
    config_class, model_class = (T.LlamaConfig, T.LlamaForCausalLM) if llama else (T.Qwen2Config, T.Qwen2ForCausalLM)
    cfg = config_class(
        vocab_size=vocab, max_position_embeddings=8192 if llama else 32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5 if llama else 1e6},
        rms_norm_eps=1e-5 if llama else 1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class ScheduledStops(Scheduler):
    """A scheduler whose rollouts listed in ``schedule`` (rollout id -> length, 0 = none) end "stopped" there,
    and, with ``lengths`` (rollout id -> length), end at EOS there; it counts admissions with a forward of their
    own and those that rode in a graphed step's refill chunk, with the tokens of the chunk sizes they rode in."""

    schedule: np.ndarray | None = None
    lengths: np.ndarray | None = None
    admissions = chunk_refills = chunk_tokens = 0

    def _admit(self, run):
        self.admissions += 1
        return super()._admit(run)

    def _take_pending(self, run, holes, chunk=None):
        adm = super()._take_pending(run, holes, chunk)
        if adm is not None and adm.chunk_layout is not None:
            self.chunk_refills += 1
            self.chunk_tokens += adm.chunk_layout.tokens
        return adm

    def _endings(self, run, rids, gen, code):
        if self.schedule is not None:
            stop_at = self.schedule[rids]
            hit = (stop_at > 0) & (gen >= stop_at)
            code = code | np.where(hit, CODE_STOP, 0).astype(code.dtype)
        if self.lengths is not None:
            code = code | np.where(gen >= self.lengths[rids], CODE_EOS, 0).astype(code.dtype)
        return super()._endings(run, rids, gen, code)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    if device != "cuda":
        return float("nan")
    n = 1 << 28
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    sync(device)
    return 2 * n * 20 / (time.perf_counter() - t)


def prompts_of(count, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def time_espo(dec, prompts, new_tokens, device, **kw):
    sync(device)
    t = time.perf_counter()
    ro = dec.generate(prompts, 1, max_new_tokens=new_tokens, temperature=1.0, eos_token_id=[], **kw)
    sync(device)
    return time.perf_counter() - t, ro


def time_hf(model, prompts, new_tokens, device, cache="dynamic"):
    """Seconds of ``model.generate`` for new_tokens tokens; cache "static" preallocates the KV cache (which lets
    transformers compile the decoding step where it can), the peer that is not host-bound."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


FUSED_OPS = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}


# the settings of --overlap-steps and --rope-decode-attention
SWITCH = {"on": [True], "off": [False], "both": [False, True]}


def throughput_rows(shape, model, args, device, bandwidth):
    """(fused, gate_up_silu, overlap_steps, rope_decode_attention) per row: each --fused-ops and --gate-up-silu
    setting, and for "both" of --overlap-steps and --rope-decode-attention one row more each, in the stopping rows'
    fused setting (not twice the rows)."""
    overlap, rda = args.overlap_steps == "on", args.rope_decode_attention == "on"
    settings = [(fused, gus, overlap, rda) for fused in FUSED_OPS[args.fused_ops]
                for gus in (GATE_UP_SILU[args.gate_up_silu] if fused is not False else [True])]
    stopping = (FUSED_OPS[args.fused_ops][-1], args.gate_up_silu != "off")
    if args.overlap_steps == "both":
        settings.append((*stopping, True, rda))
    if args.rope_decode_attention == "both":
        settings.append((*stopping, overlap, True))
    for B in args.batch:
        for i, setting in enumerate(settings):
            yield throughput_row(shape, model, args, device, bandwidth, B, *setting, with_hf=i == 0)


GATE_UP_SILU = {"on": [True], "off": [False], "both": [True, False]}
GATE_UP_SILU_ROWS = fused_ops.GATE_UP_SILU_ROWS  # the decoder's own, restored after an "off" row


def throughput_row(shape, model, args, device, bandwidth, B, fused, gate_up_silu, overlap, rope_attend, with_hf):
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    fused_ops.GATE_UP_SILU_ROWS = GATE_UP_SILU_ROWS if gate_up_silu else 0  # read at each forward: graphs hold it
    fused_ops.ROPE_DECODE_ATTENTION = rope_attend
    dec = Decoder(model, max_batch=B, max_seq_len=args.prompt_len + args.new_tokens + 1, fused_ops=fused,
                  overlap_steps=overlap)
    prompts = prompts_of(B, args.prompt_len, vocab, seed=B)
    time_espo(dec, prompts, args.new_tokens, device)  # warm-up: captures the CUDA graphs
    t_full, ro = time_espo(dec, prompts, args.new_tokens, device, seed=1)
    t_half, _ = time_espo(dec, prompts, args.new_tokens // 2, device, seed=2)
    steps = args.new_tokens - args.new_tokens // 2
    step_ms = (t_full - t_half) / steps * 1e3
    row = {
        "model": shape, "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "espo_s": t_full, "espo_tok_s": ro.tokens_generated / t_full, "step_ms": step_ms,
        "attention": dec.attention, "cuda_graphs": dec.cuda_graphs, "fused_ops": dec.fused_ops,
        "gate_up_silu": dec.fused_ops and gate_up_silu, "overlap_steps": dec.overlap_steps,
        "rope_decode_attention": dec.fused_ops and rope_attend,
    }
    if device == "cuda":
        row["floor_ms"] = weight_bytes / bandwidth * 1e3
        row["step_x_floor"] = step_ms / row["floor_ms"]
    if with_hf and not args.no_hf:  # once per batch: with --fused-ops both, on the first row
        t_hf = time_hf(model, prompts, args.new_tokens, device, args.hf_cache)
        row.update(hf_s=t_hf, hf_tok_s=B * args.new_tokens / t_hf, speedup=t_hf / t_full, hf_cache=args.hf_cache)
        if args.hf_step:  # the peer's step time by the same difference of two lengths, against the same floor
            t_hf_half = time_hf(model, prompts, args.new_tokens // 2, device, args.hf_cache)
            row["hf_step_ms"] = (t_hf - t_hf_half) / steps * 1e3
            if "floor_ms" in row:
                row["hf_step_x_floor"] = row["hf_step_ms"] / row["floor_ms"]
    if args.breakdown:
        try:
            row["breakdown"] = step_breakdown(dec, prompts, args.new_tokens, device)
        except Exception as err:  # a profiler that fails here is reported, not fatal to the run
            row["breakdown_error"] = f"{type(err).__name__}: {err}"[:200]
    print(row, flush=True)
    return row


def step_breakdown(dec, prompts, new_tokens, device) -> dict[str, dict[str, float]]:
    """One decode step's kernels by kind (``bench.common.by_kind``): launches and device ms per step, by the step_ms
    rule (a generate of new_tokens less one of new_tokens // 2, over the steps between), from torch.profiler. Beside
    step_ms it tells the GPU's busy time from its idle time (launch gaps, host work) and which kernels fill it."""
    def kinds(n):
        return by_kind(device_times(lambda: dec.generate(prompts, 1, max_new_tokens=n, temperature=1.0,
                                                         eos_token_id=[], seed=3), device, calls=2))

    full, part = kinds(new_tokens), kinds(new_tokens // 2)
    steps = new_tokens - new_tokens // 2
    none = {"launches": 0.0, "us": 0.0}
    return {kind: {"launches": (t["launches"] - part.get(kind, none)["launches"]) / steps,
                   "ms": (t["us"] - part.get(kind, none)["us"]) / steps / 1e3} for kind, t in full.items()}


def stop_schedules(rollouts: int, new_tokens: int, fractions, lengths: np.ndarray | None = None
                   ) -> dict[float, np.ndarray | None]:
    """Fraction -> rollout id -> the length it stops at (0: none), drawn from seed 0; 0.0 -> None (no stops).
    A stop falls after 1 .. T-1 tokens, T = new_tokens or, with ``lengths``, the rollout's own length."""
    rng = np.random.default_rng(0)
    schedules = {0.0: None}
    for frac in fractions:
        schedule = np.zeros(rollouts, dtype=np.int64)
        chosen = rng.choice(rollouts, size=int(round(frac * rollouts)), replace=False)
        high = new_tokens if lengths is None else np.asarray(lengths)[chosen]
        schedule[chosen] = rng.integers(1, high, size=len(chosen))
        schedules[frac] = schedule
    return schedules


def natural_lengths(rollouts: int, new_tokens: int) -> np.ndarray:
    """Each rollout's EOS length for "natural" lengths: uniform in [new_tokens // 4, new_tokens], seed 1."""
    return np.random.default_rng(1).integers(new_tokens // 4, new_tokens + 1, size=rollouts)


def stopping_rows(shape, model, args, device):
    for per_slot in args.rollouts_per_slot:
        for refill_tokens in args.refill_tokens:
            for lengths in args.stop_lengths:
                for overlap in SWITCH[args.overlap_steps]:
                    yield from stopping_rows_at(shape, model, args, device, per_slot, refill_tokens, lengths, overlap)


def stopping_rows_at(shape, model, args, device, per_slot, refill_tokens, lengths_kind, overlap):
    rows = []
    B = args.stop_slots
    R = B * per_slot
    T = args.stop_new_tokens or args.new_tokens
    fused = FUSED_OPS[args.fused_ops][-1]  # "both": the stopping rows run fused
    fused_ops.GATE_UP_SILU_ROWS = 0 if args.gate_up_silu == "off" else GATE_UP_SILU_ROWS
    fused_ops.ROPE_DECODE_ATTENTION = args.rope_decode_attention == "on"
    dec = Decoder(model, max_batch=B, max_seq_len=args.prompt_len + T + 1, refill_batch=args.refill_batch,
                  fused_ops=fused, **({} if refill_tokens is None else {"refill_tokens": refill_tokens}))
    dec.scheduler = ScheduledStops(dec.runner, prefill_tokens=dec.prefill_tokens, refill_batch=dec.refill_batch,
                                   refill_tokens=dec.refill_tokens, overlap_steps=overlap)
    prompts = prompts_of(R, args.prompt_len, model.config.vocab_size, seed=7)
    stopper = espo.EarlyStopper(espo.ESPOConfig(), B, dec.device)  # never armed: its update still runs

    def run(schedule):
        sched = dec.scheduler
        sched.schedule, sched.admissions, sched.chunk_refills, sched.chunk_tokens = schedule, 0, 0, 0
        t, ro = time_espo(dec, prompts, T, device, stopper=stopper)
        stopper.end_batch()
        return t, (ro, {"admissions": sched.admissions, "chunk_refills": sched.chunk_refills,
                        "chunk_tokens": sched.chunk_tokens})

    lengths = None if lengths_kind == "fixed" else natural_lengths(R, T)
    dec.scheduler.lengths = lengths
    schedules = stop_schedules(R, T, args.stop_fractions, lengths)
    run(None)  # warm-up
    # interleaved: each round runs every schedule once, so that a change in the machine's load falls on all
    times: dict[float, list[float]] = {frac: [] for frac in schedules}
    outs = {}
    for _ in range(args.repeats):
        for frac, schedule in schedules.items():
            t, outs[frac] = run(schedule)
            times[frac].append(t)
    (base, _), t0 = outs[0.0], float(np.median(times[0.0]))
    tok0 = base.tokens_generated
    for frac in args.stop_fractions:
        (ro, counts), t = outs[frac], float(np.median(times[frac]))
        assert ro.finish_counts["stopped"] == int((schedules[frac] > 0).sum())
        tokens_saved = 1 - ro.tokens_generated / tok0
        time_saved = 1 - t / t0
        row = {
            "model": shape, "slots": B, "rollouts": R, "prompt_len": args.prompt_len, "new_tokens": T,
            "lengths": lengths_kind,
            "stop_fraction": frac, "tokens": ro.tokens_generated, "tokens_no_stop": tok0, "s": t, "s_no_stop": t0,
            "decode_steps": ro.decode_steps, "decode_steps_no_stop": base.decode_steps,
            "tokens_saved": tokens_saved, "time_saved": time_saved, "ratio": time_saved / tokens_saved,
            # each round's own pair (the schedule against the no-stop run of the same round): the spread
            "time_saved_rounds": [1 - t_stop / t_none for t_stop, t_none in zip(times[frac], times[0.0])],
            "refill_batch": dec.refill_batch, "fused_ops": dec.fused_ops, "overlap_steps": dec.overlap_steps,
            "rope_decode_attention": dec.fused_ops and fused_ops.ROPE_DECODE_ATTENTION,
            "refill_tokens": dec.refill_tokens if dec.runner.refill_chunk is not None else 0,
            **counts,
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def fused_label(row) -> str:
    """A row's fused ops: False, True, or True without gate_up_silu (cuBLAS's gate and up GEMMs, silu_mul); with
    rope_decode_attention, and ", overlapped" for a row with overlap_steps."""
    fused = row.get("fused_ops", "")
    label = f"{fused}, no gate_up_silu" if fused and row.get("gate_up_silu") is False else str(fused)
    label += ", rope_decode_attention" if row.get("rope_decode_attention") else ""
    return label + (", overlapped" if row.get("overlap_steps") else "")


def mean_chunk_size(row) -> str:
    return f" ({row['chunk_tokens'] / row['chunk_refills']:.0f})" if row.get("chunk_refills") else ""


def fmt(v, f):
    return "" if v is None else f.format(v)


def saved_range(row) -> str:
    """" [min, max]" of a stopping row's time saved per round (empty for one round, or a row without them)."""
    rounds = row.get("time_saved_rounds") or []
    return f" [{min(rounds):.1%}, {max(rounds):.1%}]" if len(rounds) > 1 else ""


def markdown(env, tput, stops) -> str:
    lines = [
        f"espo.Decoder on {env['device']}, {env['dtype']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"flash-attn {env['flash_attn'] or 'not installed'}, {env['date']}. Random-initialised models of the named "
        "shapes (0.5b: Qwen2.5-0.5B, smollm2: SmolLM2-135M). "
        f"Command: `{env['command']}`.",
        "",
        "Throughput (sampling at temperature 1, no EOS; HF = transformers' generate at the same batch and lengths; "
        "step = one decode step, floor = weights read once at the measured copy bandwidth):",
        "",
        "| model | batch | prompt | new | espo tok/s | HF tok/s | speedup | step ms | floor ms | step / floor | "
        "HF cache | HF step ms | HF step / floor | attention | graphs | fused ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tput:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {r['espo_tok_s']:.0f} | "
            f"{fmt(r.get('hf_tok_s'), '{:.0f}')} | {fmt(r.get('speedup'), '{:.1f}x')} | {r['step_ms']:.2f} | "
            f"{fmt(r.get('floor_ms'), '{:.3f}')} | {fmt(r.get('step_x_floor'), '{:.1f}x')} | "
            f"{r.get('hf_cache', '')} | {fmt(r.get('hf_step_ms'), '{:.2f}')} | "
            f"{fmt(r.get('hf_step_x_floor'), '{:.1f}x')} | {r['attention']} | "
            f"{r['cuda_graphs']} | {fused_label(r)} |"
        )
    broken = [r for r in tput if "breakdown" in r]
    if broken:
        kinds = sorted({k for r in broken for k in r["breakdown"]} - {"all"})
        lines += [
            "",
            "Where a decode step's time goes (torch.profiler, by the step ms rule; busy = the kernels' device time, "
            "idle = step - busy: launch gaps and host work; each kind: ms (launches) per step; on the CPU the "
            "launches are aten ops, views and composites included, and busy is their CPU time):",
            "",
            "| model | batch | fused ops | step ms | busy ms | idle ms | launches | " + " | ".join(kinds) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(kinds),
        ]
        for r in broken:
            b = r["breakdown"]
            cells = [f"{b[k]['ms']:.3f} ({b[k]['launches']:.0f})" if k in b else "" for k in kinds]
            lines.append(f"| {r['model']} | {r['batch']} | {fused_label(r)} | {r['step_ms']:.2f} | "
                         f"{b['all']['ms']:.3f} | {r['step_ms'] - b['all']['ms']:.3f} | {b['all']['launches']:.0f} | "
                         + " | ".join(cells) + " |")
    lines += [
        "",
        "Early stopping (rollouts through a pool of slots; a fraction of them stopped at uniformly random points; "
        "time saved: from the median times, with the range of each round's own pair in brackets; "
        "ratio = time saved / tokens saved, target >= 0.8):",
        "",
        "| model | slots | refill_batch | refill tokens | rollouts | new | lengths | stopped | tokens saved | "
        "time saved | ratio | steps (no stop -> stop) | own prefills | refills in a step (mean chunk size) | "
        "fused ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in stops:
        lines.append(
            f"| {r['model']} | {r['slots']} | {r.get('refill_batch', '')} | {r.get('refill_tokens', '')} | "
            f"{r['rollouts']} | {r['new_tokens']} | {r.get('lengths', 'fixed')} | {r['stop_fraction']:.0%} | "
            f"{r['tokens_saved']:.1%} | {r['time_saved']:.1%}{saved_range(r)} | {r['ratio']:.2f} | "
            f"{r['decode_steps_no_stop']} -> {r['decode_steps']} | {r.get('admissions', '')} | "
            f"{r.get('chunk_refills', '')}{mean_chunk_size(r)} | {fused_label(r)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU rows: a 4-layer 256-wide float32 model, 16 slots -> bench/results/decode-cpu.*")
    parser.add_argument("--models", nargs="*", default=["0.5b"], choices=["0.5b", "1.5b", "smollm2"])
    parser.add_argument("--throughput-models", nargs="*", default=None,
                        help="the models of --models that get the throughput rows (default: all)")
    parser.add_argument("--stop-models", nargs="*", default=None,
                        help="the models of --models that get the early-stopping rows (default: all)")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--stop-slots", type=int, default=64)
    parser.add_argument(
        "--rollouts-per-slot", type=int, nargs="*", default=[4, 16],
        help="rollouts per slot in the stopping runs: a batch ends when its last rollout does, so the time saved "
        "approaches the tokens saved as more rollouts share the pool",
    )
    parser.add_argument("--stop-new-tokens", type=int, default=None,
                        help="new tokens per rollout in the early-stopping rows (default: --new-tokens)")
    parser.add_argument("--stop-fractions", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--stop-lengths", nargs="*", default=["fixed"], choices=["fixed", "natural"],
                        help="fixed: every rollout runs the new tokens (no EOS); natural: each ends at EOS at a "
                        "length uniform in [new/4, new] (seed 1), as in training, its stop falling before; a set of "
                        "rows each")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stopping setting (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                        help="generate's KV cache; static lets transformers compile the decoding step")
    parser.add_argument("--hf-step", action="store_true", help="also time generate at half length: its step time")
    parser.add_argument("--refill-batch", type=int, default=None,
                        help="the decoder's refill_batch in the early-stopping rows (default: the decoder's)")
    parser.add_argument("--refill-tokens", type=int, nargs="*", default=[None],
                        help="the decoder's refill_tokens in the early-stopping rows, a set of rows each (default: "
                        "the decoder's; 0: refills only by a forward of their own)")
    parser.add_argument("--fused-ops", default="off", choices=list(FUSED_OPS),
                        help="the decoder's fused_ops: auto (None: on a GPU with Triton), on, off (its default), "
                        "or both (a throughput row each, "
                        "in the same run; the stopping rows run fused)")
    parser.add_argument("--gate-up-silu", default="on", choices=list(GATE_UP_SILU),
                        help="with fused ops, a decode step's gate and up GEMMs and silu * up as one Triton kernel "
                        "(fused_ops.gate_up_silu), or cuBLAS's GEMMs and silu_mul (off); both: a fused row each")
    parser.add_argument("--overlap-steps", default="off", choices=list(SWITCH),
                        help="the decoder's overlap_steps (launch a step before reading the last one's finish codes); "
                        "both: the stopping rows in each setting, and one throughput row more: the stopping rows' "
                        "fused ops, overlapped")
    parser.add_argument("--rope-decode-attention", default="off", choices=list(SWITCH),
                        help="with fused ops, fused_ops.ROPE_DECODE_ATTENTION (a decode step's RoPE, cache write and "
                        "attention in one launch a layer): on for every fused row, or both: one throughput row more, "
                        "the stopping rows' fused ops with it")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile each throughput row's decode step: its kernels by kind, busy and idle time")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.smoke:
        args.models, args.batch, args.prompt_len, args.new_tokens = ["smoke"], [1, 4], 8, 8
        args.stop_slots, args.rollouts_per_slot, args.repeats, args.dtype = 4, [2], 1, "float32"
        torch.set_num_threads(1)
    if args.cpu:
        args.models, args.prompt_len, args.new_tokens, args.stop_slots, args.dtype = ["cpu"], 32, 128, 16, "float32"
    device = "cuda" if torch.cuda.is_available() and not (args.smoke or args.cpu) else "cpu"
    if device == "cpu" and not (args.smoke or args.cpu):
        parser.error("no CUDA GPU: run with --cpu for the CPU rows, or --smoke to check the script")
    bandwidth = copy_bandwidth(device)
    env = environment(device, bandwidth, dtype=args.dtype)
    tput, stops = [], []

    def save(complete: bool) -> str:
        """The results so far, written after every row (complete False until the last), so that a run cut short by
        a time limit keeps the rows it finished."""
        table = markdown(env, tput, stops)
        if not args.smoke:
            args.out.mkdir(parents=True, exist_ok=True)
            stem = "decode-cpu" if args.cpu else "decode"
            results = {"environment": env, "complete": complete, "throughput": tput, "stopping": stops}
            (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
            cut = "\n(Incomplete: the run was cut short before its last row.)\n"
            write_report(args.out / f"{stem}.md", table if complete else table + cut)
        return table

    for shape in args.models:
        model = build_model(shape, device, getattr(torch, args.dtype))
        with torch.no_grad():
            if args.throughput_models is None or shape in args.throughput_models:
                for row in throughput_rows(shape, model, args, device, bandwidth):
                    tput.append(row)
                    save(complete=False)
            if args.stop_models is None or shape in args.stop_models:
                for row in stopping_rows(shape, model, args, device):
                    stops.append(row)
                    save(complete=False)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(save(complete=True))


if __name__ == "__main__":
    main()
