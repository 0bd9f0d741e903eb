"""Your own task, trained with espo on your own model: a task is any object with two methods.

    espo model smollm2 models/smollm2                       # or any local Llama / Mistral / Qwen2 / Qwen3 folder
    python examples/own_task.py --model models/smollm2 --steps 2

``problems(n, seed)`` returns n ``espo.Problem``s (the prompt as plain text: espo renders it through the
tokenizer's chat template when it has one), the same ones for the same seed. ``reward(problem, completion)``
gets the completion as text (the prompt excluded, cut at the model's end token, special tokens removed) and
returns a finite number, 1.0 for right and 0.0 for wrong by convention. ``max_new_tokens`` (optional) caps a
rollout.
"""
from __future__ import annotations

import argparse
import random
import re
from typing import Any

from espo import Problem, TrainConfig, train


class LargerNumber:
    """Which of two two-digit numbers is larger? Right when the first number in the answer is the larger one."""

    name = "larger-number"
    max_new_tokens = 32

    def problems(self, n: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        pairs = [rng.sample(range(10, 100), 2) for _ in range(n)]
        return [Problem(prompt=f"Which number is larger, {a} or {b}? Answer with the number only.",
                        answer=str(max(a, b))) for a, b in pairs]

    def reward(self, problem: Problem, completion: str) -> float:
        first = re.search(r"\d+", completion)
        return float(first is not None and first.group() == problem.answer)


def run(model: str, steps: int, out_dir: str, **changes: Any):
    """Train ESPO on LargerNumber with the smollm2 preset's sampling and sizes (``changes`` go over them)."""
    cfg = TrainConfig.from_preset("smollm2", model=model, steps=steps, out_dir=out_dir, **changes)
    return train(cfg, task=LargerNumber(), progress=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local transformers checkpoint folder")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/larger-number", help="a new run folder")
    args = ap.parse_args()
    history = run(args.model, args.steps, args.out_dir).history
    for h in history:
        print(f"step {h['step']}: success {h['success_rate']:.2f}, stopped {h['stopped']} of {h['rollouts']} "
              f"rollouts, {h['tokens']} tokens, step {h['step_time_s']:.1f} s")


if __name__ == "__main__":
    main()
