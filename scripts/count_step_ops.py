"""Count the aten ops of one espo.Decoder decode step, by where they run: the model forward (what a CUDA graph
replays), espo.sample, and the rest of the step (slot bookkeeping, records, finish codes: host launches a graph
does not cover). On a GPU every op that is not a view is a kernel, so the counts tell a step's launch cost apart
from its arithmetic.

    python scripts/count_step_ops.py [--model DIR] [--slots 8] [--new-tokens 40] [--top-p 0.95] [--stop] [--ops 15]
    TRITON_INTERPRET=1 python scripts/count_step_ops.py --fused-ops   # the decoder's fused ops, one launch each
    TRITON_INTERPRET=1 python scripts/count_step_ops.py --fused-ops --rope-decode-attention   # and RoPE + attention
    python scripts/count_step_ops.py --admission 64   # also one prefill forward admitting 64 distinct prompts

Runs on the CPU (the counts do not depend on the device, except that espo.sample is one op call on a GPU and
the torch backend's many ops here). Without --model: the built-in tiny model. With --fused-ops each fused op
(espo.engine.fused_ops) counts as one kernel, listed as triton.<op>, and the interpreter's own work inside it not.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import espo  # noqa: E402
import espo.engine.fused_ops as fused_ops  # noqa: E402
import espo.engine.model_runner as model_runner  # noqa: E402
from espo.engine.models import load_builtin, load_model  # noqa: E402

VIEWS = {"aten.view", "aten.slice", "aten.select", "aten.unsqueeze", "aten.t", "aten.transpose", "aten.expand",
         "aten.alias", "aten.detach", "aten._unsafe_view", "aten.lift_fresh", "aten.split_with_sizes", "aten.permute"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops under the label in ``self.where`` ("forward", "sample" or "step"; None: not counted)."""

    def __init__(self):
        super().__init__()
        self.where = "step"
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.where is not None:
            self.ops[self.where][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def labelled(counter: OpCounter, where: str, fn):
    def wrapped(*args, **kwargs):
        before, counter.where = counter.where, where
        try:
            return fn(*args, **kwargs)
        finally:
            counter.where = before
    return wrapped


def one_launch(counter: OpCounter, name: str, fn):
    """``fn`` (a fused op) counted as the one kernel it launches on a GPU, as ``triton.<name>``."""
    def wrapped(*args, **kwargs):
        before = counter.where
        if before is not None:
            counter.ops[before][f"triton.{name}"] += 1
        counter.where = None
        try:
            return fn(*args, **kwargs)
        finally:
            counter.where = before
    return wrapped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a model folder (default: the built-in tiny model)")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--stop", action="store_true", help="decode with an espo.EarlyStopper")
    parser.add_argument("--fused-ops", action="store_true",
                        help="the decoder's fused ops (needs TRITON_INTERPRET=1 on the CPU)")
    parser.add_argument("--rope-decode-attention", action="store_true",
                        help="with --fused-ops, fused_ops.ROPE_DECODE_ATTENTION: a decode step's RoPE, cache write and "
                        "attention in one launch a layer")
    parser.add_argument("--overlap-steps", action="store_true",
                        help="the decoder's overlap_steps (each step launched before the last one's codes are read)")
    parser.add_argument("--admission", type=int, default=0,
                        help="also count one prefill forward of this many distinct prompts (16-24 tokens)")
    parser.add_argument("--ops", type=int, default=15, help="most frequent ops listed per part")
    args = parser.parse_args(argv)
    model, _ = load_model(args.model) if args.model else load_builtin()
    dec = espo.Decoder(model, max_batch=args.slots, max_seq_len=args.new_tokens + 16, fused_ops=args.fused_ops,
                       overlap_steps=args.overlap_steps)
    counter = OpCounter()
    fused_ops.ROPE_DECODE_ATTENTION = args.rope_decode_attention
    for name in ("rms_norm", "add_rms_norm", "rope", "silu_mul", "gate_up_silu", "rope_decode_attention"):
        setattr(fused_ops, name, one_launch(counter, name, getattr(fused_ops, name)))
    dec.runner._decode_forward = labelled(counter, "forward", dec.runner._decode_forward)
    model_runner.sample = labelled(counter, "sample", model_runner.sample)
    stopper = espo.EarlyStopper(batch_size=args.slots) if args.stop else None
    prompts = [[1, 2, 3, 4, 5]] * 2
    kw = dict(n=args.slots // 2, temperature=0.9, top_p=args.top_p, eos_token_id=[], stopper=stopper)
    dec.generate(prompts, max_new_tokens=4, **kw)  # warm-up: first-call allocations are not a step's cost
    counter.ops.clear()
    with counter:
        out = dec.generate(prompts, max_new_tokens=args.new_tokens, **kw)
    steps = out.decode_steps
    layers = len(dec.runner.policy.layers)
    print(f"{steps} decode steps over {args.slots} slots, {layers} layers; ops per step (kernels = ops that are "
          f"not views), the one prefill included in 'step':")
    for where in ("forward", "sample", "step"):
        ops = counter.ops[where]
        total, kernels = sum(ops.values()), sum(v for k, v in ops.items() if k not in VIEWS)
        extra = f", {kernels / steps / layers:.1f} kernels per layer" if where == "forward" else ""
        print(f"  {where:8s} {total / steps:7.1f} ops, {kernels / steps:7.1f} kernels{extra}")
        top = ", ".join(f"{k.removeprefix('aten.')} {v / steps:.1f}" for k, v in ops.most_common(args.ops)
                        if k not in VIEWS)
        print(f"           {top}")
    if args.admission:
        kernels = admission_kernels(model, args.admission, args.fused_ops)
        print(f"one admission of {args.admission} distinct prompts: {kernels} kernels, "
              f"{kernels / layers:.0f} per layer")


def admission_kernels(model, n: int, fused: bool) -> int:
    """Kernels of the one prefill forward that admits ``n`` distinct random prompts into an empty pool."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (16 + i % 9,), generator=g).tolist() for i in range(n)]
    dec = espo.Decoder(model, max_batch=n, max_seq_len=32, fused_ops=fused)
    counter = OpCounter()
    counter.where = None
    dec.runner.forward = labelled(counter, "admission", dec.runner.forward)
    with counter:
        dec.generate(prompts, 1, max_new_tokens=1, eos_token_id=[])
    return sum(v for k, v in counter.ops["admission"].items() if k not in VIEWS)


if __name__ == "__main__":
    main()
