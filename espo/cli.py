"""The ``espo`` command line.

    espo demo [--out DIR] [--quick]                   PPO vs ESPO and GRPO vs GRPO+CERO on the built-in task
    espo train --algo ppo|espo|grpo|grpo-cero|espo-cero [--resume] [...]   one run, metrics as JSON lines
    espo example [--backend auto|torch|triton|cuda]   run the fused op on a built-in example and print it
    espo backends                                     which backends run here, and why not
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

import torch

from .tasks import TaskError


def example_logits(batch: int = 6, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    """A built-in batch: a few peaked rows (confident steps) and a few flat ones (uncertain steps)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g)
    logits[: batch // 2, :5] += 6.0  # confident rows: most mass on a handful of tokens
    return logits


def run_example(backend: str) -> None:
    from . import EarlyStopper, ESPOConfig, sample

    logits = example_logits()
    B = logits.shape[0]
    stopper = EarlyStopper(ESPOConfig(beta=0.5), B)
    kw = dict(temperature=torch.tensor([1.0, 0.7, 0.0, 1.0, 1.0, 1.3]), top_k=torch.tensor([0, 50, 0, 0, 20, 0]),
              top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 1.0]), seed=1234, backend=backend)
    for t in range(8):  # a first batch sets the regret statistics; nothing stops before they exist
        sample(logits, offset=t, stopper=stopper, **kw)
    print("first batch:", {k: round(v, 3) for k, v in stopper.end_batch().items()})
    stopper.arm()
    print(f"\n{'step':>4} {'row':>3} {'T':>4} {'top_k':>5} {'top_p':>5} {'token':>5} {'logprob':>8} {'raw_lp':>8} "
          f"{'entropy':>7} {'regret':>7} {'z':>6} stop")
    for t in range(3):
        out = sample(logits, offset=100 + t, stopper=stopper, **kw)
        for b in range(B):
            print(f"{t:>4} {b:>3} {kw['temperature'][b].item():>4.1f} {kw['top_k'][b].item():>5} {kw['top_p'][b].item():>5.2f} "
                  f"{out.tokens[b].item():>5} {out.logprobs[b].item():>8.3f} {out.raw_logprobs[b].item():>8.3f} "
                  f"{out.entropy[b].item():>7.3f} {out.regret[b].item():>7.3f} {stopper.z[b].item():>6.2f} {bool(out.stop[b])}")
    print(f"\nbeta={stopper.beta:.2f} mean(g)={stopper.mean:.3f} var(g)={stopper.var:.3f}; "
          "a stopped row stays stopped until reset_rows() starts a new sequence there.")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per scalar field of the dataclass ``cls`` (``--espo-beta`` for ESPOConfig.beta)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        flag = "--" + prefix + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), metavar="BOOL", default=None)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=None, help=f"default {f.default}")
        elif kind == (str | None):
            parser.add_argument(flag, type=str, default=None, help="default: the built-in model")


def _config_from_args(args: argparse.Namespace):
    from .stopper import ESPOConfig
    from .trainer import TrainConfig

    espo = {f.name: getattr(args, "espo_" + f.name) for f in dataclasses.fields(ESPOConfig)}
    espo = ESPOConfig(**{k: v for k, v in espo.items() if v is not None})
    train = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig) if f.name != "espo"}
    return TrainConfig(**{k: v for k, v in train.items() if v is not None}, espo=espo)


def main(argv: list[str] | None = None) -> int:
    from .stopper import ESPOConfig
    from .trainer import TrainConfig

    parser = argparse.ArgumentParser(prog="espo", description="espo-rl: fused sampling with ESPO early stopping")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="PPO vs ESPO and GRPO vs GRPO+CERO on the built-in task, with a report")
    demo.add_argument("--out", type=Path, default=Path("espo-demo"), help="report folder (default espo-demo)")
    demo.add_argument("--quick", action="store_true", help="a run of seconds (CI): fewer steps and prompts")
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    tr = sub.add_parser("train", help="one training run; metrics as JSON lines in --out-dir")
    _add_config_flags(tr, TrainConfig)
    _add_config_flags(tr, ESPOConfig, prefix="espo-")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser("example", help="run the fused sample-and-score op on a built-in example")
    ex.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    sub.add_parser("backends", help="list the backends and why any is unavailable")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, TaskError) as err:  # the user's input: say what, not where
        if os.environ.get("ESPO_DEBUG"):
            raise
        print(f"espo {args.command}: error: {err}\n(set ESPO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from .demo import QUICK, print_summary, run_demo

        settings = dict(QUICK) if args.quick else {}
        if args.steps is not None:
            settings["steps"] = args.steps
        summaries = run_demo(args.out, device=args.device, seed=args.seed, **settings)
        print_summary(summaries, args.out)
    elif args.command == "train":
        from .trainer import train

        cfg = _config_from_args(args)
        history = train(cfg, resume=args.resume, progress=not args.no_progress).history
        last = history[-1] if history else {}
        print(f"{cfg.algo}: {len(history)} steps, {last.get('cum_tokens', 0)} rollout tokens, "
              f"eval accuracy {last.get('eval_accuracy')}; metrics in {Path(cfg.out_dir) / 'metrics.jsonl'}")
    elif args.command == "example":
        run_example(args.backend)
    elif args.command == "backends":
        from . import backends

        for info in backends().values():
            print(f"{info.name:7} {'available' if info.available else 'unavailable: ' + info.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
