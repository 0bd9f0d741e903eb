"""The word-problem task (issue 22): answer extraction on hostile text, seeded generation, rewards."""
import json
import re
from decimal import Decimal

import pytest

from espo.tasks import Task, check_task, score, task_from_checkpoint, tokens_after_mistake
from espo.tasks.word_problems import WordProblems, extract_answer


@pytest.mark.parametrize("text, value", [
    ("The answer is 7.", 7),
    ("3 + 4 = 7", 7),
    ("Tom has 3 apples, buys 4 more, so he has 7 apples now.", 7),
    ("The answer is 7. Check: 3 + 4 = 7, not 8.", 7),  # the stated answer beats a later number
    ("**Answer:** 12", 12),
    ("ANSWER IS 12", 12),
    ("so \\boxed{42}. The answer is 41 or so", 42),  # boxed beats everything
    ("\\boxed{ 1,234 }", 1234),
    ("He has 1,234,567 coins.", 1234567),
    ("It costs $15.", 15),
    ("The total is 7.0", 7),
    ("x = -5", -5),
    ("answer: −3", -3),  # U+2212 minus
    ("７ apples", 7),  # fullwidth
    ("٧", 7),  # Arabic-Indic
    ("४२ marbles", 42),  # Devanagari
    ("He drinks H2O and plays mp3 files: 9 of them.", 9),
    ("Step 1: 5+3=8\nStep 2: 8-2=6\n", 6),
    ("1,23 is not a thousands group: 5", 5),
])
def test_the_final_number_is_read_from_free_text(text, value):
    assert extract_answer(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "no numbers here", "H2O mp3 x86", "seven", "\\boxed{}", "   \n\t"])
def test_text_without_a_number_has_no_answer(text):
    assert extract_answer(text) is None


def test_extraction_of_very_long_text_is_fast_and_reads_the_end():
    text = ("blah 12 blah, " * 50_000) + "so the answer is 99"
    assert extract_answer(text) == 99
    assert extract_answer("1" * 100_000) == Decimal("1" * 100_000)
    assert extract_answer("a1" * 50_000) is None


def test_extraction_of_non_strings_is_none():
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_generation_is_deterministic_by_seed_and_prefix_stable():
    task = WordProblems(digits=2, steps=2)
    a = task.problems(40, seed=3)
    assert a == task.problems(40, seed=3)
    assert task.problems(10, seed=3) == a[:10]
    assert a != task.problems(40, seed=4)
    assert len({p.prompt for p in a}) == 40
    assert isinstance(task, Task) and check_task(task) is task


@pytest.mark.parametrize("digits, steps, ops", [(1, 1, "+-"), (1, 3, "+-"), (2, 1, "+"), (3, 2, "-")])
def test_problems_are_well_formed_and_their_answer_follows_from_the_text(digits, steps, ops):
    for p in WordProblems(digits=digits, steps=steps, ops=ops).problems(50, seed=0):
        assert p.prompt.endswith("have now?")
        numbers = [int(n) for n in re.findall(r"\d+", p.prompt)]
        assert len(numbers) == steps + 1
        assert all(n < 10 ** digits for n in numbers)
        assert numbers[1:] == [n for _, n in p.info["ops"]]
        total = numbers[0]
        for op, n in p.info["ops"]:
            total = total + n if op == "+" else total - n
            assert total >= 0
        assert str(total) == p.answer
        if ops == "+":
            assert all(op == "+" for op, _ in p.info["ops"])


def test_rewards():
    task = WordProblems()
    p = task.problems(1, seed=0)[0]
    assert score(task, p, f"The answer is {p.answer}.") == 1.0
    assert score(task, p, f"\\boxed{{{p.answer}}}") == 1.0
    assert score(task, p, f"The answer is {int(p.answer) + 1}.") == 0.0
    assert score(task, p, "") == 0.0
    assert score(task, p, "I don't know") == 0.0


def test_no_first_mistake_so_no_doomed_tokens_are_claimed():
    task = WordProblems()
    assert tokens_after_mistake(task, None, task.problems(1, 0)[0], [1, 2, 3]) is None


@pytest.mark.parametrize("bad", [{"digits": 0}, {"steps": -1}, {"digits": 7}, {"max_new_tokens": 1.5},
                                 {"steps": True}, {"ops": "*"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="WordProblems"):
        WordProblems(**bad)


def test_a_model_card_can_name_the_task(tmp_path):
    task = WordProblems(digits=2, steps=1)
    (tmp_path / "card.json").write_text(json.dumps({"task": task.config()}))
    assert task_from_checkpoint(tmp_path) == task
    (tmp_path / "card.json").write_text(json.dumps({"task": {"kind": "sudoku"}}))
    with pytest.raises(ValueError, match="sudoku"):
        task_from_checkpoint(tmp_path)
