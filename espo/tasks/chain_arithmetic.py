"""The built-in task: chained modular arithmetic, written step by step::

    prompt      Q:3+4*7-5=
    completion  3+4=7;7*7=9;9-5=4;A=4

Every operation is a bijection of the running value (``+``/``-`` by any operand, ``*`` only by operands
coprime to the modulus), so one wrong intermediate result, carried on correctly, always gives a wrong
final answer: the situation ESPO targets, where a rollout is doomed long before it ends.

The shipped model (``espo/assets/tiny-arith``, made by ``scripts/make_tiny_model.py``) is a tiny
LlamaForCausalLM over a :class:`CharTokenizer`, trained on demonstrations with injected mistakes so that
it solves the built-in task only part of the time when sampled at temperature 1. Load it with
``espo.load_builtin``, or any local checkpoint with ``espo.load_model`` (the same code path).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from espo.engine.models import builtin_card

from .base import Problem

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


def builtin_task() -> ChainArithmetic:
    """The task the shipped model was trained for (configuration read from its card)."""
    return ChainArithmetic(**builtin_card()["task"])
