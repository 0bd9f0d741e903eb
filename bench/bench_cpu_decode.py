"""espo's decode path on the CPU against its peers, interleaved, on a real checkpoint or the shipped tiny model.

    python3 bench/bench_cpu_decode.py /tmp/smol-hf --out bench/results/cpu-decode        # SmolLM2-135M-Instruct
    python3 bench/bench_cpu_decode.py --out /tmp/cpu-decode-tiny                           # the shipped tiny model

Three parts, each repeated and interleaved so that whatever else loads the machine falls on every contender alike
(median and best reported, with the load average before and after):

1. Decoding, no stops: espo.Decoder (built inside each timed call) against transformers' generate(do_sample=True)
   at batch 1, 16 and 64 with the same prompts and the same number of new tokens (EOS disabled on both sides).
2. Decoding with ESPO stops: espo.Decoder with a stopper against ``espo.generate_rollouts`` (transformers'
   generate with espo's sampler and the same stopper), which draws the same tokens and stops the same rollouts in
   float32 but keeps computing a stopped row until its batch ends. The stopper's statistics come from an unstopped
   warm-up run and its threshold value is the one that stops about a quarter of the rollouts there (a speed
   benchmark: nothing here is evaluated).
3. The token draw alone on the model's own next-token logits repeated to [B, V]: espo.sample (the CPU's "torch"
   backend, the exact integer inverse-CDF) against softmax + multinomial and its torch.compile'd version, without
   and with top-p 0.95 (the peer then sorts, as transformers' TopPLogitsWarper does).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import common
import torch

import espo
from espo import Decoder, EarlyStopper, ESPOConfig
from espo.engine.models import builtin_model_path, checkpoint_card, load_model
from espo.integrations.transformers import generate_rollouts
from espo.tasks import task_from_checkpoint
from espo.tasks.prompting import encode_prompt

TEMPERATURE = 0.7


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each contender's seconds per repeat, run in turn (A B C A B C ...), after one untimed warm-up run each."""
    for run in contenders.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            times[name].append(run())
    return times


def summary(times: list[float], work: float) -> dict[str, float]:
    return {"median_per_s": work / statistics.median(times), "best_per_s": work / min(times), "seconds": times}


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def hf_generate(model, prompts, new_tokens: int, pad: int) -> None:
    ids, mask = left_padded(prompts, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_k=None,
                         top_p=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    assert out.shape[1] - ids.shape[1] == new_tokens


def decoder_run(model, prompts, new_tokens: int, stopper=None, values=None):
    dec = Decoder(model, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + new_tokens)
    return dec.generate(prompts, 1, max_new_tokens=new_tokens, temperature=TEMPERATURE, seed=0, eos_token_id=[],
                        stopper=stopper, prompt_values=values)


def armed_stopper(model, prompts, new_tokens: int) -> tuple[EarlyStopper, list[float], float]:
    """A stopper with statistics from an unstopped run, and the prompt value that stops about a quarter of it."""
    config = ESPOConfig(alpha_s=0.5, clip=10.0, beta=6.0, eta_beta=0.0, min_tokens=4)
    stopper = EarlyStopper(config, batch_size=len(prompts))
    decoder_run(model, prompts, new_tokens, stopper)
    stopper.end_batch()
    stopper.arm()
    for value in (0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02):
        rate = decoder_run(model, prompts, new_tokens, stopper, [value] * len(prompts)).stop_rate
        stopper.reset_rows(torch.ones(len(prompts), dtype=torch.bool))
        if rate >= 0.2:
            break
    return stopper, [value] * len(prompts), rate


def decode_rows(model, tok, task, batches, new_tokens, repeats) -> list[dict]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = []
    for batch in batches:
        prompts = [encode_prompt(tok, p.prompt) for p in task.problems(batch, seed=5)]
        tokens = batch * new_tokens
        times = interleaved({
            "generate": lambda: timed(lambda: hf_generate(model, prompts, new_tokens, pad)),
            "decoder": lambda: timed(lambda: decoder_run(model, prompts, new_tokens)),
        }, repeats)
        row = {"batch": batch, "new_tokens": new_tokens, "stops": False,
               "generate": summary(times["generate"], tokens), "decoder": summary(times["decoder"], tokens)}
        row["ratio"] = row["decoder"]["median_per_s"] / row["generate"]["median_per_s"]
        rows.append(row)
        print(f"B={batch} no stops: Decoder / generate {row['ratio']:.2f}", flush=True)
        if batch == 1:
            continue
        stopper, values, rate = armed_stopper(model, prompts, new_tokens)

        def with_stops(run) -> tuple[float, int, float]:
            stopper.reset_rows(torch.ones(batch, dtype=torch.bool))
            t0 = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t0
            stopper.reset_rows(torch.ones(batch, dtype=torch.bool))
            return seconds, out.tokens_generated, out.stop_rate

        stats: dict[str, list] = {"generate": [], "decoder": []}
        runs = {
            "generate": lambda: with_stops(lambda: generate_rollouts(
                model, prompts, 1, max_new_tokens=new_tokens, temperature=TEMPERATURE, seed=0, stopper=stopper,
                eos_token_id=[], prompt_values=values)),
            "decoder": lambda: with_stops(lambda: decoder_run(model, prompts, new_tokens, stopper, values)),
        }
        for run in runs.values():  # warm-up
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                stats[name].append(run())
        row = {"batch": batch, "new_tokens": new_tokens, "stops": True, "prompt_value": values[0]}
        for name, got in stats.items():
            seconds = [s for s, _, _ in got]
            row[name] = summary(seconds, got[0][1])  # rollout tokens per second of wall-clock
            row[name]["tokens"], row[name]["stop_rate"] = got[0][1], got[0][2]
        row["ratio"] = statistics.median(row["generate"]["seconds"]) / statistics.median(row["decoder"]["seconds"])
        rows.append(row)
        print(f"B={batch} stops {row['decoder']['stop_rate']:.2f}: generate / Decoder time {row['ratio']:.2f}",
              flush=True)
    return rows


def softmax_multinomial(logits: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits / TEMPERATURE, dim=-1), 1)


def softmax_top_p_multinomial(logits: torch.Tensor, top_p: float = 0.95) -> torch.Tensor:
    """transformers' TopPLogitsWarper (ascending sort, cumulative softmax, mask), then softmax + multinomial."""
    scores = logits / TEMPERATURE
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)


@torch.no_grad()
def sample_rows(model, tok, task, batches, repeats) -> list[dict]:
    prompts = [encode_prompt(tok, p.prompt) for p in task.problems(max(batches), seed=7)]
    width = max(map(len, prompts))
    ids, mask = left_padded(prompts, tok.pad_token_id if tok.pad_token_id is not None else 0)
    all_logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()  # the model's own next-token rows
    compiled = {"softmax+multinomial": torch.compile(softmax_multinomial, dynamic=False),
                "top-p peer": torch.compile(softmax_top_p_multinomial, dynamic=False)}
    rows = []
    for batch in batches:
        logits = all_logits[:batch].contiguous()
        seeds = torch.arange(batch)
        for top_p in (1.0, 0.95):
            peer = softmax_multinomial if top_p == 1.0 else softmax_top_p_multinomial
            peer_name = "softmax+multinomial" if top_p == 1.0 else "top-p peer"
            contenders = {
                "espo.sample": lambda: espo.sample(logits, temperature=TEMPERATURE, top_p=top_p, seed=seeds, offset=3,
                                                   validate=False),
                peer_name: lambda: peer(logits),
                f"compiled {peer_name}": lambda: compiled[peer_name](logits),
            }
            times = interleaved({k: (lambda r=r: timed(r)) for k, r in contenders.items()}, repeats)
            row = {"batch": batch, "vocab": logits.shape[1], "top_p": top_p,
                   **{k: {"median_ms": 1e3 * statistics.median(v), "best_ms": 1e3 * min(v)} for k, v in times.items()}}
            row["ratio_to_peer"] = row["espo.sample"]["median_ms"] / row[peer_name]["median_ms"]
            row["ratio_to_compiled"] = row["espo.sample"]["median_ms"] / row[f"compiled {peer_name}"]["median_ms"]
            rows.append(row)
            print(f"sample B={batch} top_p={top_p}: espo.sample / peer {row['ratio_to_peer']:.2f}, / compiled "
                  f"{row['ratio_to_compiled']:.2f} ({width} prompt tokens)", flush=True)
    return rows


def markdown(env: dict, args, decode: list[dict], draws: list[dict]) -> list[str]:
    md = [f"# espo's decode path against its peers on {env['model']} (CPU)", "",
          f"{env['date']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"{env['threads']} threads, float32, T = {TEMPERATURE}, load average before {env['load_before']}, after "
          f"{env['load_after']}. Command: `{env['command']}`. {args.repeats} interleaved repeats; medians (best in "
          "the json).", "",
          "## Decoding (EOS disabled; a Decoder is built inside each timed call)", "",
          "| batch | stops | rollout tokens (stop rate) | Decoder tok/s | generate tok/s | Decoder / generate |",
          "|---|---|---|---|---|---|"]
    for r in decode:
        d, g = r["decoder"], r["generate"]
        tokens = f"{d.get('tokens', r['batch'] * r['new_tokens'])} ({d.get('stop_rate', 0.0):.2f})"
        label = "ESPO (generate_rollouts vs Decoder)" if r["stops"] else "none"
        md.append(f"| {r['batch']} | {label} | {tokens} | {d['median_per_s']:.0f} | {g['median_per_s']:.0f} | "
                  f"{r['ratio']:.2f}x |")
    md += ["", "With stops both sides draw the same tokens and stop the same rollouts; the ratio is generate's "
           "wall-clock over the Decoder's (generate keeps computing a stopped row until its batch ends). The pool is "
           "the batch here (every rollout has a slot from the start), so a freed slot takes no new work: what a stop "
           "saves is only the smaller batch of the remaining steps.", "",
           "| batch | Decoder: tokens saved by the stops | Decoder: time saved (median; range over repeats) |",
           "|---|---|---|"]
    plain = {r["batch"]: r for r in decode if not r["stops"]}
    for r in (r for r in decode if r["stops"]):
        base = plain[r["batch"]]["decoder"]["seconds"]
        ratios = [1 - s / b for s in r["decoder"]["seconds"] for b in base]
        saved = 1 - statistics.median(r["decoder"]["seconds"]) / statistics.median(base)
        md.append(f"| {r['batch']} | {1 - r['decoder']['tokens'] / (r['batch'] * r['new_tokens']):.0%} | "
                  f"{saved:.0%} ({min(ratios):.0%} to {max(ratios):.0%}) |")
    md += ["",
           "## The token draw alone, on the model's own next-token logits", "",
           "| batch x vocab | top-p | espo.sample ms | peer ms | compiled peer ms | espo / peer | espo / compiled |",
           "|---|---|---|---|---|---|---|"]
    for r in draws:
        peer = "softmax+multinomial" if r["top_p"] == 1.0 else "top-p peer"
        md.append(f"| {r['batch']} x {r['vocab']} | {r['top_p']} | {r['espo.sample']['median_ms']:.2f} | "
                  f"{r[peer]['median_ms']:.2f} | {r['compiled ' + peer]['median_ms']:.2f} | "
                  f"{r['ratio_to_peer']:.2f}x | {r['ratio_to_compiled']:.2f}x |")
    md += ["", "The peer at top-p 1 is softmax + multinomial; at top-p 0.95 it is transformers' TopPLogitsWarper "
           "(a sort of the vocabulary) then softmax + multinomial. espo.sample also returns the token's log-prob, "
           "raw log-prob, entropy and regret, and draws each row from its own (seed, position)."]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a converted checkpoint folder (default: the tiny model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="the results' stem: OUT.json and OUT.md")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from an existing OUT.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.repeats = len(saved["decode"][0]["decoder"]["seconds"])
        args.out.with_suffix(".md").write_text("\n".join(markdown(saved["env"], args, saved["decode"],
                                                                   saved["sample"])) + "\n")
        return
    model_dir = args.model or str(builtin_model_path())
    model, tok = load_model(model_dir)
    model.eval()
    task = task_from_checkpoint(model_dir)
    env = {**common.environment("cpu"), "threads": torch.get_num_threads(),
           "model": checkpoint_card(model_dir).get("description", Path(model_dir).name),
           "command": "python3 " + " ".join(sys.argv), "load_before": [round(x, 2) for x in os.getloadavg()]}
    decode = decode_rows(model, tok, task, args.batch, args.new_tokens, args.repeats)
    draws = sample_rows(model, tok, task, args.batch, max(5, 4 * args.repeats))
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "decode": decode, "sample": draws}, indent=1))
    md = markdown(env, args, decode, draws)
    common.write_report(args.out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
