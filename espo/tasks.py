"""Verifiable tasks: the interface the trainer needs, the built-in one, and scoring a model on one.

The trainer needs two things from a task: problems to roll out and a reward for each completion.
Any object with these two methods is a task (see :class:`Task`)::

    problems(n: int, seed: int) -> list[Problem]       # deterministic given (n, seed)
    reward(problem: Problem, completion: str) -> float  # 1.0 correct, 0.0 wrong by convention

Optional attributes the trainer uses when present: ``name`` (for messages), ``max_new_tokens``
(a generation budget) and ``first_mistake(problem, completion) -> int | None`` (where a wrong completion
went wrong; it gives the oracle ceiling on what early stopping can save). Always call a task through
:func:`score`, which turns a crash or a non-number into a :class:`TaskError` naming the task and the problem.

Built in: :class:`ChainArithmetic`, chained modular arithmetic written step by step::

    prompt      Q:3+4*7-5=
    completion  3+4=7;7*7=9;9-5=4;A=4

Every operation is a bijection of the running value (``+``/``-`` by any operand, ``*`` only by operands
coprime to the modulus), so one wrong intermediate result, carried on correctly, always gives a wrong
final answer: the situation ESPO targets, where a rollout is doomed long before it ends.

The shipped model (``espo/assets/tiny-arith``, made by ``scripts/make_tiny_model.py``) is a tiny
LlamaForCausalLM over a :class:`CharTokenizer`, trained on demonstrations with injected mistakes so that
it solves the built-in task only part of the time when sampled at temperature 1. Load it with
``espo.models.load_builtin``, or any local checkpoint with ``espo.models.load_model`` (the same code path).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import torch

from .checks import is_integer
from .models import CARD_FILE, builtin_card, checkpoint_card

__all__ = [
    "ChainArithmetic",
    "Problem",
    "Task",
    "TaskError",
    "builtin_task",
    "check_task",
    "score",
    "success_rate",
    "task_from_checkpoint",
    "tokens_after_mistake",
]



# --------------------------------------------------------------------------------------------------
# Task interface
# --------------------------------------------------------------------------------------------------
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


def _short(obj: Any, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        raise TaskError(f"task {_task_name(task)!r} returned {_short(bad, 80)} (type {type(bad).__name__}) among its "
                        "problems; each must be an espo.Problem (or any object with a string .prompt)")
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
            f"{_short(problem)} with completion {_short(completion, 120)}"
        ) from exc
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TaskError(
            f"task {_task_name(task)!r} returned {_short(value, 80)} (type {type(value).__name__}) for problem "
            f"{_short(problem)}; reward must return a finite number"
        )
    value = float(value)
    if not math.isfinite(value):
        raise TaskError(
            f"task {_task_name(task)!r} returned {value} for problem {_short(problem)}; reward must be finite"
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
                        f"{_short(problem)}") from exc
    if at is None:
        return 0
    if not is_integer(at) or at < 0:
        raise TaskError(f"task {_task_name(task)!r} returned {_short(at, 80)} from first_mistake for problem "
                        f"{_short(problem)}; it must return None or a character offset >= 0")
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


# --------------------------------------------------------------------------------------------------
# Built-in task: chained modular arithmetic, written step by step
# --------------------------------------------------------------------------------------------------
_APPLY = {
    "+": lambda x, d, m: (x + d) % m,
    "-": lambda x, d, m: (x - d) % m,
    "*": lambda x, d, m: (x * d) % m,
}


@dataclass(frozen=True)
class ChainArithmetic:
    """Chained arithmetic modulo ``modulus``, ``steps`` operations, solved one step per clause.

    ``Q:3+4*7-5=`` is answered ``3+4=7;7*7=9;9-5=4;A=4``: left to right (no precedence), every result
    reduced modulo ``modulus``. The start value is in ``[0, modulus)``; operands are single digits 1-9
    (``*`` only by digits 2-9 coprime to the modulus, so every step is a bijection and a wrong step can
    never be undone by later correct ones).

    With ``lost_thread``, a demonstration that makes a mistake loses the thread there, as a reasoning model
    that has gone wrong loops until its length limit: the wrong clause ends with ``:`` instead of ``;``, and
    from there the writer repeats that clause's operation on its own result, clause after clause ending with
    ``:``, and no answer comes, up to ``max_new_tokens`` (three times a correct completion's length). A model
    trained on such demonstrations runs its wrong rollouts long, so most tokens of a wrong rollout come after
    its first mistake, where an early stop saves them.

    Reward rule (exact): the answer is the run of digits right after the first ``A=`` in the completion;
    the reward is 1.0 iff that run is exactly the decimal answer (no sign, no leading zeros, no spaces),
    else 0.0. The run ends at the first non-digit; text after it is ignored (a well-formed completion
    ends with EOS there), but a later ``A=`` never counts. Intermediate steps are not checked.
    """

    steps: int = 6
    modulus: int = 10
    ops: str = "+-*"
    lost_thread: bool = False
    name: str = "chain-arithmetic"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not isinstance(self.modulus, int) or self.modulus < 2:
            raise ValueError(f"modulus must be an int >= 2, got {self.modulus!r}")
        if not self.ops or any(o not in _APPLY for o in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be distinct characters from '+-*', got {self.ops!r}")
        if "*" in self.ops and not self._operands("*"):
            raise ValueError(f"no digit 2-9 is coprime to modulus {self.modulus}; drop '*' from ops")
        if not isinstance(self.lost_thread, bool):
            raise ValueError(f"lost_thread must be True or False, got {self.lost_thread!r}")

    #: the characters a tokenizer for this task needs
    alphabet: ClassVar[str] = "0123456789+-*=;:AQ"

    def _operands(self, op: str) -> list[int]:
        if op == "*":
            return [d for d in range(2, 10) if math.gcd(d, self.modulus) == 1]
        return list(range(1, 10))

    @property
    def max_new_tokens(self) -> int:
        """Tokens a correct completion takes, EOS included, plus a small margin (three times that with
        ``lost_thread``: the limit that wrong completions run to)."""
        w = len(str(self.modulus - 1))
        correct = self.steps * (2 * w + 4) + 2 + w + 1 + 4
        return 3 * correct if self.lost_thread else correct

    def config(self) -> dict[str, Any]:
        config = {"steps": self.steps, "modulus": self.modulus, "ops": self.ops}
        return {**config, "lost_thread": True} if self.lost_thread else config

    def make_problem(self, start: int, chain: Sequence[tuple[str, int]]) -> Problem:
        chain = tuple((str(o), int(d)) for o, d in chain)
        x = start % self.modulus
        for o, d in chain:
            x = _APPLY[o](x, d, self.modulus)
        prompt = "Q:" + str(start) + "".join(f"{o}{d}" for o, d in chain) + "="
        return Problem(prompt=prompt, answer=str(x), info={"start": start, "chain": chain})

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems from ``seed``; the first k of ``problems(n, s)`` are ``problems(k, s)``."""
        if n < 0:
            raise ValueError("n must be >= 0")
        rng = random.Random(int(seed))
        operands = {o: self._operands(o) for o in self.ops}
        out = []
        for _ in range(n):
            start = rng.randrange(self.modulus)
            chain = []
            for _ in range(self.steps):
                o = rng.choice(self.ops)
                chain.append((o, rng.choice(operands[o])))
            out.append(self.make_problem(start, chain))
        return out

    def demonstration(self, problem: Problem, mistake_rate: float = 0.0, rng: random.Random | None = None) -> str:
        """A worked completion; each step's result is replaced, with probability ``mistake_rate``, by a
        uniformly drawn wrong value that the later steps (and the answer) then carry on from (with
        ``lost_thread``: the thread is lost at the first wrong value)."""
        if mistake_rate > 0 and rng is None:
            raise ValueError("a random.Random is needed when mistake_rate > 0")
        x = int(problem.info["start"])
        parts = []
        for o, d in problem.info["chain"]:
            y = _APPLY[o](x, d, self.modulus)
            if mistake_rate > 0 and rng.random() < mistake_rate:
                y = (y + rng.randrange(1, self.modulus)) % self.modulus
                if self.lost_thread:
                    return self._lose_thread("".join(parts) + f"{x}{o}{d}={y}:", y, o, d)
            parts.append(f"{x}{o}{d}={y};")
            x = y
        return "".join(parts) + f"A={x}"

    def _lose_thread(self, text: str, x: int, o: str, d: int) -> str:
        """``text`` continued by the clause ``x o d`` repeated on its own results, each ending with ``:``, cut
        at the length limit (no EOS: a lost completion never ends by itself)."""
        while len(text) < self.max_new_tokens:
            y = _APPLY[o](x, d, self.modulus)
            text += f"{x}{o}{d}={y}:"
            x = y
        return text[: self.max_new_tokens]

    def solution(self, problem: Problem) -> str:
        return self.demonstration(problem)

    _ANSWER: ClassVar[re.Pattern] = re.compile(r"A=(\d*)")

    def extract_answer(self, completion: str) -> str | None:
        """The digits right after the first ``A=`` ('' if none follow), or None if there is no ``A=``."""
        m = self._ANSWER.search(completion)
        return None if m is None else m.group(1)

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if self.extract_answer(completion) == problem.answer else 0.0

    def first_mistake(self, problem: Problem, completion: str) -> int | None:
        """Character offset of the first place where ``completion`` leaves the worked solution, or None if
        it is the solution. ``len(completion)`` when it stops short of the solution (the ending was the
        mistake). Every operation being a bijection, a wrong intermediate result dooms the answer from the
        character where it is written: a perfect early stopper would stop a wrong completion right there.
        """
        solution = self.solution(problem)
        if completion == solution:
            return None
        common = min(len(completion), len(solution))
        return next((i for i in range(common) if completion[i] != solution[i]), common)



# --------------------------------------------------------------------------------------------------
# The shipped model's task
# --------------------------------------------------------------------------------------------------
def builtin_task() -> ChainArithmetic:
    """The task the shipped model was trained for (configuration read from its card)."""
    return ChainArithmetic(**builtin_card()["task"])


def task_from_checkpoint(path: str | Path) -> Any:
    """The built-in task a checkpoint's card.json names, or None when it names none.

    ``{"task": {"steps": 6, "modulus": 10, ...}}`` (as ``scripts/make_tiny_model.py`` writes) is
    :class:`ChainArithmetic`; ``{"task": {"kind": "word-problems", "digits": 1, "steps": 1}}`` is
    :class:`espo.word_problems.WordProblems` (what its ``config()`` returns). A task entry that is not one of
    these (another kind, a field the task lacks, a bad value) raises a ValueError naming card.json and the field.
    """
    from .word_problems import WordProblems  # imported here: word_problems imports this module

    card_path = Path(path).expanduser() / CARD_FILE
    card = checkpoint_card(path)
    if card is None:
        return None
    if not isinstance(card, dict):
        raise ValueError(f"{card_path} holds a JSON {type(card).__name__}, not an object: a card is an object "
                         'such as {"task": {"kind": "word-problems", "digits": 1, "steps": 1}}')
    config = card.get("task")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f'{card_path}: its "task" must be an object such as {{"kind": "word-problems", "digits": 1, '
                         f'"steps": 1}}, got {_short(config, 80)}')
    config = dict(config)
    kind = config.pop("kind", "chain-arithmetic")
    kinds = {"chain-arithmetic": ChainArithmetic, "word-problems": WordProblems}
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"{card_path}: task.kind {_short(kind, 80)} is not a built-in task kind; the built-in kinds "
                         "are 'chain-arithmetic' and 'word-problems' (or pass your own task: train(cfg, task=...))")
    fields = [f.name for f in dataclasses.fields(kinds[kind]) if f.init]
    unknown = sorted(str(k) for k in config if k not in fields)
    if unknown:
        raise ValueError(f"{card_path}: task.{unknown[0]} is not a field of a {kind} task (its fields: "
                         f"{', '.join(fields)}); remove or rename it")
    try:
        return kinds[kind](**config)
    except (TypeError, ValueError) as err:
        bad = next((f for f in fields if f in str(err)), None)
        where = f"task.{bad}" if bad else "its task"
        raise ValueError(f"{card_path}: {where} is not valid for a {kind} task ({err}); fix it in card.json") \
            from None


@torch.no_grad()
def success_rate(model, tokenizer, task: Any, n: int = 200, seed: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 256, max_new_tokens: int | None = None,
                 problems: Sequence[Problem] | None = None, return_completions: bool = False):
    """Fraction of ``task.problems(n, seed)`` (or ``problems``) that the model solves, sampled as the trainer
    samples: through ``espo.Decoder`` (``temperature=0``: greedy; ``top_p < 1``: nucleus), prompts through the
    tokenizer's chat template when it has one (``espo.prompting.encode_prompt``), each completion ending at the
    model's end tokens (``stop_token_ids``) and decoded without special tokens before the reward.

    Works with a :class:`CharTokenizer` or a transformers tokenizer. Rollout ``i`` is drawn with
    ``espo.rollout_seed(seed, i)``, so the rate is repeatable on any machine and batch size.
    """
    from .decoder import Decoder
    from .prompting import encode_prompt, stop_token_ids

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
