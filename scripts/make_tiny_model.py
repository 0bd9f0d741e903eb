r"""Build a tiny model for espo's built-in task (the recipe of the one the package ships, espo/assets/tiny-arith).

Trains a small LlamaForCausalLM (random init, character-level vocabulary) on worked solutions of the
built-in ChainArithmetic task, in which each step's result is, with probability --mistake-rate, replaced
by a wrong value that the rest of the solution carries on from. The model learns the arithmetic, and
also learns to put about that much probability on a wrong result at each step, so when sampled at
temperature 1 it solves only part of the problems (the target is 30-50%), while greedy decoding mostly
succeeds: room for RL to learn, and rollouts that go wrong early, which is what ESPO stops. With
--lost-thread (the default, the shipped model's task) a demonstration that goes wrong loses the thread and
writes wrong clauses up to the length limit without answering, as a reasoning model that has gone wrong
keeps going: the model's wrong rollouts then run long, and most of their tokens come after the mistake.

The script measures greedy and temperature-1 success on --eval-n fresh problems, and if the sampled rate
falls outside [--band-low, --band-high] it re-tunes the mistake rate and trains again (at most --rounds
times). It saves the model (safetensors), the tokenizer (char_tokenizer.json) and card.json.
Deterministic given --seed (on one machine, torch version and thread count).

--out is required: the new model goes to a folder of your choosing, with its own name (--name, default the
folder's name) and description in its card. The shipped model's folder is written only with --rebuild-shipped.

    # a model of the shipped recipe in ./tiny-model (a few minutes on 2 idle CPU cores)
    python scripts/make_tiny_model.py --out tiny-model

    # the larger model of the GPU study
    python scripts/make_tiny_model.py --out /tmp/arith-big --name arith-big --device cuda \
        --hidden 384 --layers 6 --heads 6 --intermediate 1152 --task-steps 8 --train-steps 3000

    # rebuild the model the package ships, in place
    python scripts/make_tiny_model.py --out espo/assets/tiny-arith --rebuild-shipped

Exit codes: 0 the model was written (or, with --dry-run, measured) and its sampled success rate is inside
[--band-low, --band-high]; 2 a usage error, or the rate missed the band after --rounds rounds: the model is
still written (its card says "in_band": false) and one line on stderr says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from espo.engine.models import CARD_FILE, builtin_model_path  # noqa: E402
from espo.engine.tokenizer import TOKENIZER_FILE, CharTokenizer  # noqa: E402
from espo.tasks import ChainArithmetic, success_rate  # noqa: E402

SHIPPED_NAME = "tiny-arith"
SHIPPED_DESCRIPTION = ("Tiny LlamaForCausalLM for espo's built-in ChainArithmetic task, trained on worked solutions "
                       "with injected mistakes so that temperature-1 sampling succeeds only part of the time")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the folder to write the new model to (required unless --dry-run); the package's own "
                        "espo/assets only with --rebuild-shipped")
    p.add_argument("--rebuild-shipped", action="store_true",
                   help="write into the package's espo/assets (the shipped model's folder), under its name and "
                        "description")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-steps", type=int, default=6, help="operations per problem")
    p.add_argument("--modulus", type=int, default=10)
    p.add_argument("--ops", default="+-*")
    p.add_argument("--lost-thread", action=argparse.BooleanOptionalAction, default=True,
                   help="wrong demonstrations run on to the length limit after their first mistake (the built-in "
                        "model's task; --no-lost-thread for the short-completion variant)")
    p.add_argument("--target", type=float, default=0.4, help="sampled success rate aimed at")
    p.add_argument("--mistake-rate", type=float, default=None,
                   help="per-step mistake probability in the demonstrations (default: 1 - target**(1/steps))")
    p.add_argument("--band-low", type=float, default=0.30)
    p.add_argument("--band-high", type=float, default=0.50)
    p.add_argument("--rounds", type=int, default=2, help="training runs at most (re-tuning the mistake rate)")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--eval-seed", type=int, default=12345, help="problems seed for the measurement (fresh)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="where to train (cuda for the larger models of the GPU study)")
    p.add_argument("--name", default=None, help="the model's name in its card (default: the --out folder's name)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--dry-run", action="store_true", help="train and measure, do not write a model")
    args = p.parse_args(argv)
    check_out(p, args)
    return args


def _is_shipped_folder(out: Path) -> bool:
    """Whether ``out`` is, or lies inside, the package's own assets folder (where the shipped model lives)."""
    assets, where = builtin_model_path().parent.resolve(), out.expanduser().resolve()
    return where == assets or assets in where.parents


def check_out(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--out is required (but with --dry-run); the package's espo/assets is written only with --rebuild-shipped."""
    if args.out is None and not args.dry_run:
        p.error("--out DIR is required: the folder to write the new model to (e.g. --out tiny-model)")
    if args.out is not None and _is_shipped_folder(args.out) != args.rebuild_shipped:
        if args.rebuild_shipped:
            p.error(f"--rebuild-shipped writes the shipped model's folder only: pass --out {builtin_model_path()}")
        p.error(f"--out {args.out} is the package's own espo/assets, where the shipped model lives: choose another "
                "folder, or pass --rebuild-shipped to rebuild the shipped model")
    if args.name is None:
        args.name = SHIPPED_NAME if args.rebuild_shipped or args.out is None else args.out.expanduser().resolve().name


def build_model(tok: CharTokenizer, args):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(128, args.max_positions),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(args.device)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return model


def make_batch(task: ChainArithmetic, tok: CharTokenizer, problem_seed: int, n: int, mistake_rate: float,
               rng: random.Random):
    """Right-padded (input_ids, attention_mask, labels); the loss covers the completion and its EOS only."""
    rows, prompt_lens = [], []
    for prob in task.problems(n, problem_seed):
        prompt = tok.encode(prob.prompt, add_bos=True)
        text = task.demonstration(prob, mistake_rate, rng)
        completion = tok.encode(text, add_eos="A=" in text)  # a lost completion runs to the limit, no EOS
        rows.append(prompt + completion)
        prompt_lens.append(len(prompt))
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for k, (r, pl) in enumerate(zip(rows, prompt_lens)):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
        labels[k, pl: len(r)] = ids[k, pl: len(r)]
    return ids, mask, labels


def train(task, tok, args, mistake_rate: float):
    model = build_model(tok, args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.train_steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(args.seed)
    # training problem seeds: far from the small seeds that evaluations and trainers use (eval: --eval-seed)
    base = 2**40 + args.seed * 2**20
    t0, running = time.time(), None
    for step in range(args.train_steps):
        ids, mask, labels = make_batch(task, tok, base + step, args.batch_size, mistake_rate, rng)
        dev = args.device
        loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.train_steps:
            print(f"  step {step + 1:5d}/{args.train_steps}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}"
                  f"  {time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return model, time.time() - t0, running


def measure(model, tok, task, args):
    greedy = success_rate(model, tok, task, n=args.eval_n, seed=args.eval_seed, temperature=0.0)
    sampled = success_rate(model, tok, task, n=args.eval_n, seed=args.eval_seed, temperature=1.0)
    return greedy, sampled


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = ChainArithmetic(steps=args.task_steps, modulus=args.modulus, ops=args.ops, lost_thread=args.lost_thread)
    tok = CharTokenizer(task.alphabet)
    longest_prompt = len(task.problems(1, 0)[0].prompt) + len(str(args.modulus))  # + BOS, widest start value
    args.max_positions = longest_prompt + task.max_new_tokens
    mistake_rate = args.mistake_rate if args.mistake_rate is not None else 1 - args.target ** (1 / task.steps)
    start = time.time()
    history = []
    for rnd in range(1, args.rounds + 1):
        print(f"round {rnd}: mistake rate {mistake_rate:.4f}, {args.train_steps} steps x {args.batch_size}", flush=True)
        model, train_s, final_loss = train(task, tok, args, mistake_rate)
        greedy, sampled = measure(model, tok, task, args)
        print(f"round {rnd}: success on {args.eval_n} fresh problems: greedy {greedy:.3f}, sampled (T=1) {sampled:.3f}",
              flush=True)
        history.append({"round": rnd, "mistake_rate": round(mistake_rate, 6), "train_seconds": round(train_s, 1),
                        "final_loss": round(final_loss, 5), "greedy": greedy, "sampled": sampled})
        if args.band_low <= sampled <= args.band_high:
            break
        # success ~ (1 - eff)^steps, with eff = the model's own per-step error; move the demonstration rate
        # by the ratio of the per-step error the target needs to the one measured
        measured_err = 1 - max(sampled, 1e-3) ** (1 / task.steps)
        wanted_err = 1 - args.target ** (1 / task.steps)
        mistake_rate = min(0.9, max(1e-3, mistake_rate * wanted_err / measured_err))
    total_s = time.time() - start
    ok = args.band_low <= sampled <= args.band_high

    n_params = sum(p.numel() for p in model.parameters())
    card = {
        "name": args.name,
        "description": describe(args, task, n_params, sampled),
        "task": task.config(),
        "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": tok.vocab_size, "chars": "".join(tok.chars)},
        "model": {"architecture": "LlamaForCausalLM", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                  "num_attention_heads": args.heads, "intermediate_size": args.intermediate,
                  "parameters": n_params, "dtype": "float32"},
        "training": {"seed": args.seed, "steps": args.train_steps, "batch_size": args.batch_size, "lr": args.lr,
                     "warmup": args.warmup, "optimizer": "AdamW(0.9, 0.98), wd 0.01, cosine to 0.1x, clip 1.0",
                     "mistake_rate": round(mistake_rate, 6), "final_loss": round(final_loss, 5),
                     "rounds": history, "seconds_total": round(total_s, 1), "threads": torch.get_num_threads()},
        "success": {"n": args.eval_n, "eval_seed": args.eval_seed, "greedy": greedy, "sampled_t1": sampled,
                    "max_new_tokens": task.max_new_tokens, "in_band": ok, "band": [args.band_low, args.band_high]},
        "date": _dt.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "command": "python scripts/make_tiny_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"total {total_s:.1f}s; parameters {n_params}")
    if args.dry_run:
        print(json.dumps(card["success"]))
        return 0 if ok else missed_band(args, sampled, None)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", TOKENIZER_FILE, CARD_FILE):
        (out / name).unlink(missing_ok=True)  # only what this script writes; anything else is left alone
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps only what goes wrong
    model.cpu().save_pretrained(out)
    tok.save(out / TOKENIZER_FILE)
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors is written 0600; the assets are meant to be read by anyone
    size = sum(f.stat().st_size for f in out.iterdir())
    card["size_bytes"] = size
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({size / 1e6:.2f} MB): greedy {greedy:.3f}, sampled {sampled:.3f}")
    return 0 if ok else missed_band(args, sampled, out)


def missed_band(args: argparse.Namespace, sampled: float, out: Path | None) -> int:
    """Say in one line on stderr that the sampled rate missed its band (and where the model went); exit code 2."""
    kept = f"the model was written to {out} anyway (its card says in_band: false)" if out else "nothing was written"
    print(f"make_tiny_model.py: error: the sampled success rate {sampled:.3f} missed the band [{args.band_low}, "
          f"{args.band_high}] after {args.rounds} round(s); {kept}: rerun with more --rounds, another --mistake-rate "
          "or more --train-steps", file=sys.stderr)
    return 2


def describe(args: argparse.Namespace, task: ChainArithmetic, n_params: int, sampled: float) -> str:
    """The card's description: the shipped model's own for a rebuild of it, else one of this model."""
    if args.rebuild_shipped:
        return SHIPPED_DESCRIPTION + ("; after a mistake a demonstration loses the thread and runs on to the length "
                                      "limit." if task.lost_thread else ".")
    return (f"{args.name}: a LlamaForCausalLM ({n_params} parameters) made by espo's scripts/make_tiny_model.py for "
            f"ChainArithmetic(steps={task.steps}, modulus={task.modulus}, ops={task.ops!r}, "
            f"lost_thread={task.lost_thread}), trained on worked solutions with injected mistakes; sampled success "
            f"(T=1) {sampled:.3f}. Not the model espo ships.")


if __name__ == "__main__":
    sys.exit(main())
