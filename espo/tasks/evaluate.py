"""A model's success rate on a task, sampled as the trainer samples."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from espo.engine.decoder import Decoder

from .base import Problem, check_task, score
from .prompting import encode_prompt, stop_token_ids


@torch.no_grad()
def success_rate(model, tokenizer, task: Any, n: int = 200, seed: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 256, max_new_tokens: int | None = None,
                 problems: Sequence[Problem] | None = None, return_completions: bool = False):
    """Fraction of ``task.problems(n, seed)`` (or ``problems``) that the model solves, sampled as the trainer
    samples: through ``espo.Decoder`` (``temperature=0``: greedy; ``top_p < 1``: nucleus), prompts through the
    tokenizer's chat template when it has one (``espo.tasks.prompting.encode_prompt``), each completion ending at the
    model's end tokens (``stop_token_ids``) and decoded without special tokens before the reward.

    Works with a :class:`CharTokenizer` or a transformers tokenizer. Rollout ``i`` is drawn with
    ``espo.rollout_seed(seed, i)``, so the rate is repeatable on any machine and batch size.
    """
    check_task(task)
    probs = list(problems) if problems is not None else task.problems(n, seed)
    if max_new_tokens is None:
        max_new_tokens = int(getattr(task, "max_new_tokens", 64))
    prompts = [encode_prompt(tokenizer, p.prompt) for p in probs]
    if not prompts:
        return (0.0, []) if return_completions else 0.0
    param = next(model.parameters())
    decoder = Decoder(model, max_batch=min(batch_size, len(prompts)), max_seq_len=max(map(len, prompts)) +
                      max_new_tokens, device=param.device, dtype=param.dtype)
    out = decoder.generate(prompts, 1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           eos_token_id=stop_token_ids(tokenizer, model), progress=False)
    texts = [tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True) for r in out]
    rate = sum(score(task, p, text) for p, text in zip(probs, texts)) / len(probs)
    return (rate, texts) if return_completions else rate
