"""README's own-task example (examples/own_task.py) runs as written on a chat model with a Hugging Face
tokenizer: a task that is only two methods, trained through the smollm2 preset's path."""
import importlib.util
from pathlib import Path

from model_folders import make_model_folder

from espo import Problem

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_task.py"


def _example():
    spec = importlib.util.spec_from_file_location("own_task", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_task_scores_the_first_number_of_the_answer():
    task = _example().LargerNumber()
    problems = task.problems(50, seed=1)
    assert problems == task.problems(50, seed=1) and len({p.prompt for p in problems}) > 40
    p = Problem(prompt="Which number is larger, 31 or 74? Answer with the number only.", answer="74")
    assert task.reward(p, "74") == 1.0 and task.reward(p, "The larger number is 74.") == 1.0
    assert task.reward(p, "31 is smaller, so 74") == 0.0 and task.reward(p, "") == 0.0
    assert task.reward(p, "740") == 0.0 and task.reward(p, "seventy-four") == 0.0


def test_the_example_trains_on_a_chat_model(tmp_path):
    make_model_folder(tmp_path / "model")
    result = _example().run(str(tmp_path / "model"), 1, str(tmp_path / "run"), prompts_per_step=2, group_size=2,
                            num_problems=4, eval_problems=2, max_batch=4, ppo_epochs=1, minibatches=1)
    assert len(result.history) == 1 and result.history[0]["rollouts"] == 4
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
