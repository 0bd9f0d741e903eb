"""The task interface the trainer needs, and the checked calls through which it uses a task.

The trainer needs two things from a task: problems to roll out and a reward for each completion.
Any object with these two methods is a task (see :class:`Task`)::

    problems(n: int, seed: int) -> list[Problem]       # deterministic given (n, seed)
    reward(problem: Problem, completion: str) -> float  # 1.0 correct, 0.0 wrong by convention

Optional attributes the trainer uses when present: ``name`` (for messages), ``max_new_tokens``
(a generation budget) and ``first_mistake(problem, completion) -> int | None`` (where a wrong completion
went wrong; it gives the oracle ceiling on what early stopping can save). Always call a task through
:func:`score`, which turns a crash or a non-number into a :class:`TaskError` naming the task and the problem.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

from espo.checks import is_integer, short_repr


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt the model continues, the reference answer, and task-specific data."""

    prompt: str
    answer: str
    info: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task. Bring your own: any object with these two methods works.

    ``problems(n, seed)`` must be deterministic given its arguments. ``reward(problem, completion)``
    gets the completion text only (the prompt excluded, special tokens removed, cut at EOS) and returns a
    finite number, 1.0 for correct and 0.0 for wrong by convention.
    """

    def problems(self, n: int, seed: int) -> list[Problem]: ...

    def reward(self, problem: Problem, completion: str) -> float: ...


class TaskError(RuntimeError):
    """A task broke its contract: its reward raised, or returned something other than a finite number."""


def _task_name(task: Any) -> str:
    name = getattr(task, "name", None)
    return name if isinstance(name, str) and name else type(task).__name__


def check_task(task: Any) -> Any:
    """Return ``task`` if it has callable ``problems`` and ``reward`` methods, else raise TaskError."""
    missing = [m for m in ("problems", "reward") if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(
            f"task {_task_name(task)!r} lacks the method(s) {', '.join(missing)}; a task needs "
            "problems(n, seed) -> list[Problem] and reward(problem, completion) -> float"
        )
    return task


def task_problems(task: Any, n: int, seed: int) -> list[Problem]:
    """``task.problems(n, seed)``, checked: exactly ``n`` problems, each with a string ``prompt``; else TaskError."""
    try:
        problems = list(task.problems(n, seed=seed))
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TaskError(
            f"task {_task_name(task)!r} raised {type(exc).__name__}: {exc} in problems({n}, seed={seed})"
        ) from exc
    if len(problems) != n:
        raise TaskError(f"task {_task_name(task)!r} returned {len(problems)} problems from problems({n}, seed={seed}); "
                        f"it must return exactly {n}")
    bad = next((p for p in problems if not isinstance(getattr(p, "prompt", None), str)), None)
    if bad is not None:
        raise TaskError(f"task {_task_name(task)!r} returned {short_repr(bad, 80)} (type {type(bad).__name__}) "
                        "among its problems; each must be an espo.Problem (or any object with a string .prompt)")
    return problems


def score(task: Any, problem: Any, completion: str) -> float:
    """``task.reward(problem, completion)`` as a float, or a TaskError that names the task and the problem.

    Accepted: any real number (int, float, bool, numpy scalar) or a one-element tensor, if finite.
    """
    try:
        value = task.reward(problem, completion)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TaskError(
            f"task {_task_name(task)!r} raised {type(exc).__name__}: {exc} while scoring problem "
            f"{short_repr(problem)} with completion {short_repr(completion, 120)}"
        ) from exc
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TaskError(
            f"task {_task_name(task)!r} returned {short_repr(value, 80)} (type {type(value).__name__}) for problem "
            f"{short_repr(problem)}; reward must return a finite number"
        )
    value = float(value)
    if not math.isfinite(value):
        raise TaskError(
            f"task {_task_name(task)!r} returned {value} for problem {short_repr(problem)}; reward must be finite"
        )
    return value


def tokens_after_mistake(task: Any, tokenizer: Any, problem: Any, tokens: Sequence[int]) -> int | None:
    """Tokens of a wrong completion that come after the token holding its first mistake: what a perfect
    early stopper (one that stops at the mistake, keeping that token, as ESPO keeps its trigger) would cut.

    None when the task has no ``first_mistake`` method. Raises TaskError when that method raises or
    returns something other than None or a non-negative int.
    """
    hook = getattr(task, "first_mistake", None)
    if not callable(hook):
        return None
    tokens = list(tokens)
    decode = lambda n: tokenizer.decode(tokens[:n], skip_special_tokens=True)  # noqa: E731
    text = decode(len(tokens))
    try:
        at = hook(problem, text)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TaskError(f"task {_task_name(task)!r} raised {type(exc).__name__}: {exc} in first_mistake for problem "
                        f"{short_repr(problem)}") from exc
    if at is None:
        return 0
    if not is_integer(at) or at < 0:
        raise TaskError(f"task {_task_name(task)!r} returned {short_repr(at, 80)} from first_mistake for problem "
                        f"{short_repr(problem)}; it must return None or a character offset >= 0")
    if at >= len(text):
        return 0  # the ending itself was the mistake: nothing after it to cut
    lo, hi = 0, len(tokens) - 1  # the first token whose decoded prefix reaches past character `at`
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(mid + 1)) > at:
            hi = mid
        else:
            lo = mid + 1
    return len(tokens) - (lo + 1)
