"""The built-in task and score()'s contract checks."""
import random

import pytest
import torch

from espo.engine.tokenizer import CharTokenizer
from espo.tasks import (
    ChainArithmetic,
    Problem,
    Task,
    TaskError,
    check_task,
    score,
    tokens_after_mistake,
)


# ---------------------------------------------------------------------------------------------- task
def test_generation_is_deterministic_and_prefix_stable():
    task = ChainArithmetic(steps=5, modulus=10)
    a, b = task.problems(50, seed=7), task.problems(50, seed=7)
    assert a == b
    assert task.problems(10, seed=7) == a[:10]
    assert task.problems(50, seed=8) != a
    assert len({p.prompt for p in a}) > 45
    for p in a:
        assert p.prompt.startswith("Q:") and p.prompt.endswith("=")
        assert p.prompt.count("+") + p.prompt.count("-") + p.prompt.count("*") == 5
    assert isinstance(task, Task)


def test_example_and_solution_format():
    task = ChainArithmetic(steps=3, modulus=10)
    p = task.make_problem(3, [("+", 4), ("*", 7), ("-", 5)])
    assert p.prompt == "Q:3+4*7-5=" and p.answer == "4"
    assert task.solution(p) == "3+4=7;7*7=9;9-5=4;A=4"
    assert task.reward(p, task.solution(p)) == 1.0
    wide = ChainArithmetic(steps=2, modulus=100)
    q = wide.make_problem(37, [("*", 3), ("-", 9)])
    assert q.prompt == "Q:37*3-9=" and q.answer == "2" and wide.solution(q) == "37*3=11;11-9=2;A=2"


def test_solutions_are_correct_and_within_budget():
    for task in (ChainArithmetic(), ChainArithmetic(steps=4, modulus=100), ChainArithmetic(steps=8, ops="+-")):
        tok = CharTokenizer(task.alphabet)
        for p in task.problems(200, seed=1):
            sol = task.solution(p)
            assert task.reward(p, sol) == 1.0
            assert len(tok.encode(sol, add_eos=True)) <= task.max_new_tokens


def test_one_wrong_step_dooms_the_answer():
    """Every operation is a bijection, so a single wrong intermediate, carried on, gives a wrong answer."""
    task = ChainArithmetic(steps=6, modulus=10)
    assert task._operands("*") == [3, 7, 9]
    rng = random.Random(0)
    for p in task.problems(100, seed=3):
        start, chain = p.info["start"], p.info["chain"]
        k = rng.randrange(len(chain))
        x = start
        steps = []
        for i, (o, d) in enumerate(chain):
            y = eval(f"({x}{o}{d}) % 10")
            if i == k:
                y = (y + rng.randrange(1, 10)) % 10
            steps.append(f"{x}{o}{d}={y};")
            x = y
        assert task.reward(p, "".join(steps) + f"A={x}") == 0.0


def test_first_mistake_points_at_the_first_wrong_character():
    task = ChainArithmetic(steps=3, modulus=10)
    p = task.make_problem(3, [("+", 4), ("*", 7), ("-", 5)])
    solution = task.solution(p)
    assert solution == "3+4=7;7*7=9;9-5=4;A=4"
    assert task.first_mistake(p, solution) is None
    assert task.first_mistake(p, "3+4=8;8*7=6;6-5=1;A=1") == 4  # the wrong result digit
    assert task.first_mistake(p, "3+4=7;7*7=9;9-5=4;A=5") == len(solution) - 1
    assert task.first_mistake(p, "3+4=7;7*7") == 9  # stopped short: the ending is the mistake
    assert task.first_mistake(p, solution + "7") == len(solution)


def test_tokens_after_mistake_maps_characters_to_tokens():
    task = ChainArithmetic(steps=3, modulus=10)
    tok = CharTokenizer(ChainArithmetic.alphabet)
    p = task.make_problem(3, [("+", 4), ("*", 7), ("-", 5)])
    wrong = "3+4=8;8*7=6;6-5=1;A=1"
    ids = tok.encode(wrong) + [tok.eos_token_id]
    assert tokens_after_mistake(task, tok, p, ids) == len(ids) - 5  # keeps "3+4=8", cuts the rest and EOS
    ids_with_special = ids[:2] + [tok.bos_token_id] + ids[2:]  # a special token decodes to nothing
    assert tokens_after_mistake(task, tok, p, ids_with_special) == len(ids) - 5
    assert tokens_after_mistake(task, tok, p, tok.encode(task.solution(p)) + [tok.eos_token_id]) == 0
    assert tokens_after_mistake(task, tok, p, tok.encode("3+4=7;7*7")) == 0  # ran out of length: nothing to cut
    assert tokens_after_mistake(task, tok, p, []) == 0

    class NoHook:
        def problems(self, n, seed):
            return []

        def reward(self, problem, completion):
            return 0.0

    assert tokens_after_mistake(NoHook(), tok, p, ids) is None

    class BadHook(ChainArithmetic):
        def first_mistake(self, problem, completion):
            return "here"

    class RaisingHook(ChainArithmetic):
        def first_mistake(self, problem, completion):
            raise IndexError("boom")

    with pytest.raises(TaskError, match="None or a character offset"):
        tokens_after_mistake(BadHook(), tok, p, ids)
    with pytest.raises(TaskError, match="raised IndexError: boom in first_mistake"):
        tokens_after_mistake(RaisingHook(), tok, p, ids)


def test_demonstrations_inject_mistakes_at_the_rate():
    task = ChainArithmetic(steps=6)
    rng = random.Random(0)
    probs = task.problems(2000, seed=5)
    assert all(task.demonstration(p, 0.0) == task.solution(p) for p in probs[:50])
    ok = sum(task.reward(p, task.demonstration(p, 0.125, rng)) for p in probs) / len(probs)
    assert abs(ok - 0.875 ** 6) < 0.05  # ~0.45 (two mistakes can rarely cancel)
    with pytest.raises(ValueError):
        task.demonstration(probs[0], 0.1)  # needs an rng


def test_reward_rule():
    task = ChainArithmetic(steps=3)
    p = task.make_problem(3, [("+", 4), ("*", 7), ("-", 5)])  # answer 4
    good = "3+4=7;7*7=9;9-5=4;"
    assert task.reward(p, good + "A=4") == 1.0
    assert task.reward(p, "A=4") == 1.0  # only the final answer is checked
    assert task.reward(p, good + "A=5") == 0.0
    # malformed
    for bad in ["", good, good + "A=", good + "A= 4", good + "A=04", good + "A=-4", good + "a=4", good + "4"]:
        assert task.reward(p, bad) == 0.0, bad
    # text after the answer: the digit run ends the answer; what follows is ignored ...
    assert task.reward(p, good + "A=4;") == 1.0
    assert task.reward(p, good + "A=4Q:1+1=") == 1.0
    # ... but more digits are part of the answer, and only the first A= counts
    assert task.reward(p, good + "A=41") == 0.0
    assert task.reward(p, good + "A=5;A=4") == 0.0
    assert task.reward(p, good + "A=4;A=5") == 1.0
    assert task.extract_answer(good + "A=4;") == "4" and task.extract_answer(good) is None


def test_task_validation():
    with pytest.raises(ValueError):
        ChainArithmetic(steps=0)
    with pytest.raises(ValueError):
        ChainArithmetic(ops="+/")
    with pytest.raises(ValueError):
        ChainArithmetic(modulus=2 * 3 * 5 * 7)  # no digit 2-9 coprime to it
    ChainArithmetic(modulus=210, ops="+-")


# ---------------------------------------------------------------------------------------------- score()
class _Raises:
    name = "exploding"

    def problems(self, n, seed):
        return [Problem("Q:1=", "1")] * n

    def reward(self, problem, completion):
        raise KeyError("boom")


class _Returns:
    def __init__(self, value):
        self.value = value

    def problems(self, n, seed):
        return [Problem("Q:1=", "1")] * n

    def reward(self, problem, completion):
        return self.value


def test_score_wraps_a_raising_task():
    prob = Problem("Q:1+2=", "3")
    with pytest.raises(TaskError, match=r"'exploding' raised KeyError.*boom.*Q:1\+2=") as info:
        score(_Raises(), prob, "A=3")
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("value", [None, "1.0", [1.0], float("nan"), float("inf"), torch.ones(2)])
def test_score_rejects_non_numbers(value):
    with pytest.raises(TaskError, match=r"_Returns.*Q:1="):
        score(_Returns(value), Problem("Q:1=", "1"), "A=1")


@pytest.mark.parametrize("value,expected", [(1, 1.0), (0.5, 0.5), (True, 1.0), (torch.tensor(0.25), 0.25)])
def test_score_accepts_numbers(value, expected):
    got = score(_Returns(value), Problem("Q:1=", "1"), "A=1")
    assert isinstance(got, float) and got == expected


def test_score_builtin_and_check_task():
    task = ChainArithmetic(steps=2)
    p = task.problems(1, 0)[0]
    assert score(task, p, task.solution(p)) == 1.0
    assert check_task(task) is task
    with pytest.raises(TaskError, match="lacks the method"):
        check_task(object())
