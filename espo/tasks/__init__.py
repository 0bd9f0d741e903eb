"""Verifiable tasks: the interface the trainer needs (``base``), the built-in ones (``chain_arithmetic``,
``word_problems``), prompts through a tokenizer's chat template (``prompting``), the task a checkpoint's card
names (``registry``) and a model's success rate on a task (``evaluate``)."""
from .base import Problem, Task, TaskError, check_task, score, task_problems, tokens_after_mistake
from .chain_arithmetic import ChainArithmetic, builtin_task
from .evaluate import success_rate
from .registry import task_from_checkpoint

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
    "task_problems",
    "tokens_after_mistake",
]
