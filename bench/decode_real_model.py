"""espo.Decoder against transformers' generate on a real checkpoint (the CPU), same prompts, same new tokens.

    python3 bench/decode_real_model.py /tmp/smol-hf --batch 1 16 64 --new-tokens 32 --repeats 2 \\
        --out bench/results/real-decode

Prompts are the model's card task's problems through the chat template; EOS is disabled on both sides (the
Decoder gets no end tokens, generate gets min_new_tokens = max_new_tokens), so both produce exactly
batch x new-tokens tokens. Each repeat runs generate then the Decoder (a new Decoder per call: its setup is part
of the cost a user pays), interleaved, so whatever else loads the machine falls on both alike. Reported: best
and median tokens/s of each, the ratio of the medians, the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import common
import torch

from espo import Decoder  # noqa: E402
from espo.models import checkpoint_card, load_model  # noqa: E402
from espo.prompting import encode_prompt  # noqa: E402
from espo.tasks import task_from_checkpoint  # noqa: E402


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def time_generate(model, prompts, new_tokens: int, pad: int) -> float:
    ids, mask = left_padded(prompts, pad)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, top_k=None, top_p=None, pad_token_id=pad)
    seconds = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == new_tokens
    return seconds


def time_decoder(model, prompts, new_tokens: int) -> float:
    t0 = time.perf_counter()
    dec = Decoder(model, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + new_tokens)
    out = dec.generate(prompts, 1, max_new_tokens=new_tokens, seed=0, eos_token_id=[])
    seconds = time.perf_counter() - t0
    assert all(r.length == new_tokens for r in out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="the results' stem: OUT.json and OUT.md")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    task = task_from_checkpoint(args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    env = {**common.environment("cpu"), "threads": torch.get_num_threads(),
           "load_before": [round(x, 2) for x in os.getloadavg()]}
    rows = []
    for batch in args.batch:
        prompts = [encode_prompt(tok, p.prompt) for p in task.problems(batch, seed=5)]
        gen, dec = [], []
        for _ in range(args.repeats):
            gen.append(time_generate(model, prompts, args.new_tokens, pad))
            dec.append(time_decoder(model, prompts, args.new_tokens))
        tokens = batch * args.new_tokens
        row = {"batch": batch, "new_tokens": args.new_tokens, "generate_s": gen, "decoder_s": dec,
               "generate_tok_s_best": tokens / min(gen), "decoder_tok_s_best": tokens / min(dec),
               "generate_tok_s_median": tokens / statistics.median(gen),
               "decoder_tok_s_median": tokens / statistics.median(dec)}
        row["ratio_median"] = row["decoder_tok_s_median"] / row["generate_tok_s_median"]
        rows.append(row)
        print(f"B={batch}: Decoder {row['decoder_tok_s_median']:.0f} tok/s, generate "
              f"{row['generate_tok_s_median']:.0f} tok/s, ratio {row['ratio_median']:.2f}", flush=True)
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    name = checkpoint_card(args.model).get("description", Path(args.model).name)
    md = [f"# espo.Decoder vs transformers generate on {name} (CPU)", "",
          f"{env['date']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"{env['threads']} threads, float32, load average before {env['load_before']}, after {env['load_after']}. "
          f"Command: `python3 bench/decode_real_model.py {args.model} --batch {' '.join(map(str, args.batch))} "
          f"--new-tokens {args.new_tokens} --repeats {args.repeats} --out {args.out}`. Prompts: the card task's "
          f"problems through the chat template; sampling at T = 1 over the whole vocabulary; EOS disabled on both "
          f"sides; {args.repeats} interleaved repeats; a Decoder is built inside each timed call.", "",
          "| batch | new tokens | Decoder tok/s (median, best) | generate tok/s (median, best) | Decoder / generate |",
          "|---|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['new_tokens']} | {r['decoder_tok_s_median']:.0f}, {r['decoder_tok_s_best']:.0f} | "
           f"{r['generate_tok_s_median']:.0f}, {r['generate_tok_s_best']:.0f} | {r['ratio_median']:.2f}x |"
           for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
