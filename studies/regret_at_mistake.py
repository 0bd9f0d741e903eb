"""Is ESPO's signal there? The regret of the token that holds a wrong completion's first mistake.

For each checkpoint made for the built-in task (its card.json names the task), samples completions at
temperature 1 with transformers' generate, keeps the wrong ones, finds each one's first mistake with the
task's ``first_mistake`` and prints how the surrogate regret (max log-prob minus the token's log-prob)
at that token is distributed. High regrets there mean a regret-based stopper can see the mistake; a
confidently wrong policy (regret near 0) is the case ESPO cannot stop.

    python studies/regret_at_mistake.py                          # the shipped model
    python studies/regret_at_mistake.py --models DIR [DIR ...]   # checkpoints from scripts/make_tiny_model.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from espo.engine.models import builtin_model_path, load_model
from espo.tasks import success_rate, task_from_checkpoint


@torch.no_grad()
def regrets_at_mistakes(path, n: int, seed: int) -> tuple[float, torch.Tensor]:
    """(sampled success rate, regret at the first mistake of each wrong completion that has one)."""
    model, tok = load_model(path)
    task = task_from_checkpoint(path)
    if task is None:
        raise SystemExit(f"{path} has no card.json naming its task; make it with scripts/make_tiny_model.py")
    problems = task.problems(n, seed)
    rate, texts = success_rate(model, tok, task, problems=problems, return_completions=True, seed=seed)
    regrets = []
    for problem, text in zip(problems, texts):
        at = task.first_mistake(problem, text)
        if task.reward(problem, text) >= 1 or at is None or at >= len(text):
            continue
        prompt = tok.encode(problem.prompt, add_bos=True)
        ids = prompt + tok.encode(text)
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        before = len(prompt) + at - 1  # the logits that drew the mistaken character
        regrets.append((logp[before].max() - logp[before, ids[before + 1]]).item())
    return rate, torch.tensor(regrets)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[str(builtin_model_path())])
    parser.add_argument("--n", type=int, default=600, help="problems sampled per model")
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args(argv)
    for path in args.models:
        rate, r = regrets_at_mistakes(path, args.n, args.seed)
        if not len(r):
            print(f"{path}: success {rate:.3f}; no wrong completion with a mistake inside it")
            continue
        print(f"{path}: success {rate:.3f}; {len(r)} wrong completions; regret at the first mistake: median "
              f"{r.median():.2f} nats, below 1: {(r < 1).float().mean():.0%}, above 3: {(r > 3).float().mean():.0%}")


if __name__ == "__main__":
    main()
