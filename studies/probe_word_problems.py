"""Sampled success of a chat model on espo.tasks.word_problems.WordProblems, through espo.Decoder (issue 22).

    python3 studies/probe_word_problems.py /tmp/smol-hf --settings 1x1@0.7/1.0 1x1@1.0/1.0 --out probe.json

Each setting is DIGITSxSTEPS[OPS]@TEMPERATURE/TOP_P (OPS '+' for additions only; default '+-'); every one uses
the same problems (seed 0) and sampling seed.
Prompts go through the tokenizer's chat template; rollouts end at the model's end tokens
(espo.tasks.prompting.stop_token_ids) or at --max-new tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from espo import Decoder
from espo.engine.models import load_model
from espo.tasks import score
from espo.tasks.prompting import encode_prompt, stop_token_ids
from espo.tasks.word_problems import WordProblems


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--settings", nargs="+", required=True)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=80)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    eos = stop_token_ids(tok, model)
    results = []
    for setting in args.settings:
        size, sampling = setting.split("@")
        ops = "+" if size.endswith("+") else "+-"
        digits, steps = (int(x) for x in size.rstrip("+").split("x"))
        temperature, top_p = (float(x) for x in sampling.split("/"))
        task = WordProblems(digits=digits, steps=steps, ops=ops, max_new_tokens=args.max_new)
        problems = task.problems(args.problems, seed=0)
        prompts = [encode_prompt(tok, p.prompt) for p in problems]
        dec = Decoder(model, max_batch=args.problems * args.samples, max_seq_len=max(map(len, prompts)) + args.max_new,
                      device="cpu", dtype=torch.float32)
        t0 = time.perf_counter()
        out = dec.generate(prompts, args.samples, max_new_tokens=args.max_new, temperature=temperature, top_p=top_p,
                           seed=1, eos_token_id=eos, progress=False)
        rows = []
        for r in out:
            p = problems[r.prompt_index]
            text = tok.decode(r.tokens.tolist(), skip_special_tokens=True)
            rows.append({"prompt": p.prompt, "answer": p.answer, "completion": text, "finish": r.finish_reason,
                         "tokens": int(r.length), "reward": score(task, p, text)})
        rate = sum(r["reward"] for r in rows) / len(rows)
        res = {"setting": setting, "digits": digits, "steps": steps, "ops": ops,
               "temperature": temperature, "top_p": top_p,
               "success": rate, "n": len(rows), "seconds": round(time.perf_counter() - t0, 1),
               "mean_tokens_right": _mean([r["tokens"] for r in rows if r["reward"]]),
               "mean_tokens_wrong": _mean([r["tokens"] for r in rows if not r["reward"]]),
               "length_limited": sum(r["finish"] == "length" for r in rows), "rows": rows}
        results.append(res)
        print(f"{setting}: success {rate:.3f} ({sum(r['reward'] for r in rows):.0f}/{len(rows)}) in {res['seconds']}s, "
              f"tokens right {res['mean_tokens_right']:.1f} wrong {res['mean_tokens_wrong']:.1f}, "
              f"length-limited {res['length_limited']}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
