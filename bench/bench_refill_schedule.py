"""The schedules behind bench_decode.py's early-stopping rows, and the ratio they allow, on the CPU.

For each refill design: how many decode steps, prefill forwards of their own and decode steps carrying a refill
chunk a pool of --slots slots takes for --rollouts-per-slot x slots rollouts of --new-tokens tokens, without
stops and with a fraction of them stopped (the same scheduled stops as bench_decode.py). Two kinds of lengths:
"fixed", bench_decode.py's rows, where every rollout runs --new-tokens and the baseline's slots refill in
synchronised waves; "natural", where each rollout ends at EOS at its own length (drawn uniformly from
[new/4, new]), so the baseline refills scattered slots and drains too, as in training. No timing: the ends are
scheduled, so the counts depend neither on the model nor on the device, and the tiny smoke model decodes them
here, CUDA graphs emulated (each graph's forward run eagerly, so that the scheduler decides as on a GPU).

From the counts, two ratios (time saved / tokens saved, bench_decode.py's target >= 0.8):
- bound: steps saved / tokens saved, what a decoder whose step costs the same at any batch (a launch-bound GPU
  step) reaches with free prefills: once the pending rollouts run out the pool drains, and a step that decodes
  fewer rows costs as much;
- predicted: with a step, a prefill forward and a refill chunk's extra compute costing --step-ms, --prefill-ms
  and --chunk-ms (a 256-token chunk; a refill rides in the smallest chunk size that holds it, costed in
  proportion to its tokens) (defaults: see --help; an estimate to compare with a GPU run, not a measurement).
  With overlapped steps (Decoder(overlap_steps=True)) a rollout that ends is drawn once more and its slot refilled
  a step later: the counts say what that costs in steps; the host time it hides between steps is not in the model.

    python bench/bench_refill_schedule.py       # -> bench/results/refill-schedule.{json,md}
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_decode import RESULTS, ScheduledStops, build_model, natural_lengths, prompts_of, stop_schedules
from common import environment, write_report

from espo.engine.decoder import Decoder

# (name, CUDA graphs, refill_batch (None: slots // 8), refill_tokens, overlap_steps)
DESIGNS = [
    ("a prefill forward per freed slot (measured 2026-12-04)", True, 1, 0, False),
    ("refill_batch: a prefill forward per slots // 8 freed", True, None, 0, False),
    ("refill chunk of 128 tokens in the graphed step", True, None, 128, False),
    ("refill chunk of 256 tokens (the default)", True, None, 256, False),
    ("refill chunk of 256 tokens, overlapped steps", True, None, 256, True),
    ("eager: refills in every step's forward (no graphs)", False, 1, 0, False),
]


def schedule_rows(args) -> list[dict]:
    torch.set_num_threads(1)
    model = build_model("smoke", "cpu", torch.float32)
    T, R = args.new_tokens, args.slots * args.rollouts_per_slot
    prompts = prompts_of(R, args.prompt_len, model.config.vocab_size, seed=7)
    rows = []
    for lengths_name in args.lengths:
        lengths = None if lengths_name == "fixed" else natural_lengths(R, T)
        schedules = stop_schedules(R, T, args.stop_fractions, lengths)
        rows += design_rows(args, model, prompts, schedules, lengths_name, lengths)
    return rows


def design_rows(args, model, prompts, schedules, lengths_name, lengths) -> list[dict]:
    B, T, rows = args.slots, args.new_tokens, []
    for name, graphs, refill_batch, refill_tokens, overlap in DESIGNS:
        dec = Decoder(model, max_batch=B, max_seq_len=args.prompt_len + T + 1, cuda_graphs=False)
        runner = dec.runner
        if graphs:
            runner.cuda_graphs = True
            runner._decode_graphed = lambda b, length, chunk=None, r=runner: r._decode_forward(b, length, chunk)
        refill_batch = refill_batch or max(1, B // 8)
        dec.scheduler = sched = ScheduledStops(runner, prefill_tokens=dec.prefill_tokens, refill_batch=refill_batch,
                                               refill_tokens=refill_tokens, overlap_steps=overlap)
        counts = {}
        sched.lengths = lengths
        for frac, schedule in schedules.items():
            sched.schedule, sched.admissions, sched.chunk_refills, sched.chunk_tokens = schedule, 0, 0, 0
            ro = dec.generate(prompts, 1, max_new_tokens=T, temperature=1.0, seed=1, eos_token_id=[])
            counts[frac] = dict(tokens=ro.tokens_generated, steps=ro.decode_steps, prefills=sched.admissions,
                                chunk_steps=sched.chunk_refills, chunk_tokens=sched.chunk_tokens)
        base = counts[0.0]

        def cost(c):
            return c["steps"] * args.step_ms + c["prefills"] * args.prefill_ms + c["chunk_tokens"] / 256 * args.chunk_ms

        for frac in args.stop_fractions:
            c = counts[frac]
            tokens_saved = 1 - c["tokens"] / base["tokens"]
            row = dict(lengths=lengths_name, design=name, refill_batch=refill_batch, refill_tokens=refill_tokens,
                       stop_fraction=frac, **c, steps_no_stop=base["steps"], prefills_no_stop=base["prefills"],
                       chunk_steps_no_stop=base["chunk_steps"], chunk_tokens_no_stop=base["chunk_tokens"],
                       tokens_saved=tokens_saved,
                       predicted_s_no_stop=cost(base) / 1e3 if graphs else None,
                       predicted_s=cost(c) / 1e3 if graphs else None,
                       steps_saved=1 - c["steps"] / base["steps"],
                       predicted_ratio=(1 - cost(c) / cost(base)) / tokens_saved if graphs else None)
            row["bound"] = row["steps_saved"] / tokens_saved
            rows.append(row)
            print(row, flush=True)
    return rows


def mean_chunk(row) -> str:
    """The mean chunk size a refill rode in, without stops -> with them ("" for designs without a chunk)."""
    sizes = [t / s for t, s in ((row["chunk_tokens_no_stop"], row["chunk_steps_no_stop"]),
                                (row["chunk_tokens"], row["chunk_steps"])) if s]
    return " -> ".join(f"{m:.0f}" for m in sizes)


def markdown(env, args, rows) -> str:
    lines = [
        f"Refill schedules of bench_decode.py's early-stopping rows, counted on the CPU ({env['date']}, torch "
        f"{env['torch']}; CUDA graphs emulated). {args.slots} slots, {args.slots * args.rollouts_per_slot} "
        f"rollouts of {args.prompt_len}-token prompts and at most {args.new_tokens} new tokens; lengths fixed (no "
        "EOS) or natural (EOS at a length uniform in [new/4, new], seed 1); stops scheduled at uniformly random "
        "points before the end (seed 0). Counts, not times: bound = steps saved / tokens saved (free "
        f"prefills, a step costing the same at any batch); predicted = with {args.step_ms} ms a step, "
        f"{args.prefill_ms} ms a prefill forward and {args.chunk_ms} ms more for a step carrying a 256-token refill "
        "chunk, a smaller chunk size in proportion (a refill rides in the smallest of the chunk's sizes, halved "
        "down to 32 tokens, that holds it; mean size: tokens / steps with a chunk) "
        f"(estimates, not measurements; none for the eager design, whose steps cost more). "
        f"Command: `{env['command']}`.",
        "",
        "| lengths | design | stopped | tokens saved | steps (no stop -> stop) | prefill forwards | "
        "steps with a chunk | mean chunk size | steps saved | bound | predicted s (no stop -> stop) | "
        "predicted ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lengths']} | {r['design']} | {r['stop_fraction']:.0%} | {r['tokens_saved']:.1%} | "
            f"{r['steps_no_stop']} -> {r['steps']} | {r['prefills_no_stop']} -> {r['prefills']} | "
            f"{r['chunk_steps_no_stop']} -> {r['chunk_steps']} | {mean_chunk(r)} | {r['steps_saved']:.1%} | "
            f"{r['bound']:.2f} | "
            + ("n/a | n/a |" if r["predicted_ratio"] is None else
               f"{r['predicted_s_no_stop']:.1f} -> {r['predicted_s']:.1f} | {r['predicted_ratio']:.2f} |")
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rollouts-per-slot", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--stop-fractions", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--lengths", nargs="*", default=["fixed", "natural"], choices=["fixed", "natural"],
                        help="fixed: every rollout runs --new-tokens (bench_decode.py's rows); natural: each ends at "
                        "EOS at a length drawn uniformly from [new/4, new] (seed 1), a stop falling before it")
    parser.add_argument("--step-ms", type=float, default=3.86,
                        help="a graphed decode step (bench/results/decode.md: 0.5B shape, B = 64, H200)")
    parser.add_argument("--prefill-ms", type=float, default=21.0,
                        help="a prefill forward of its own: 20-23 ms solves decode.md's stop rows (2.5x, 2.4x the "
                        "time) with these counts")
    parser.add_argument("--chunk-ms", type=float, default=0.4,
                        help="what a 256-token refill chunk adds to a step (a guess: 256 more rows through the GEMMs); "
                        "a smaller chunk size adds in proportion to its tokens")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = environment("cpu", float("nan"), dtype="float32")
    rows = schedule_rows(args)
    table = markdown(env, args, rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refill-schedule.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    write_report(args.out / "refill-schedule.md", table)


if __name__ == "__main__":
    main()
