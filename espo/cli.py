"""The ``espo`` command line.

    espo example [--backend auto|torch|triton|cuda]   run the fused op on a built-in example and print it
    espo backends                                     which backends run here, and why not
"""
from __future__ import annotations

import argparse
import sys

import torch


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="espo", description="espo-rl: fused sampling with ESPO early stopping")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="run the fused sample-and-score op on a built-in example")
    ex.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    sub.add_parser("backends", help="list the backends and why any is unavailable")
    args = parser.parse_args(argv)
    if args.command == "example":
        run_example(args.backend)
    elif args.command == "backends":
        from . import backends

        for info in backends().values():
            print(f"{info.name:7} {'available' if info.available else 'unavailable: ' + info.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
