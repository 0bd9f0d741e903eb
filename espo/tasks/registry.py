"""The built-in task a checkpoint's card.json names."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from espo.checks import short_repr
from espo.engine.models import CARD_FILE, checkpoint_card

from .chain_arithmetic import ChainArithmetic
from .word_problems import WordProblems


def task_from_checkpoint(path: str | Path) -> Any:
    """The built-in task a checkpoint's card.json names, or None when it names none.

    ``{"task": {"steps": 6, "modulus": 10, ...}}`` (as ``scripts/make_tiny_model.py`` writes) is
    :class:`ChainArithmetic`; ``{"task": {"kind": "word-problems", "digits": 1, "steps": 1}}`` is
    :class:`espo.tasks.word_problems.WordProblems` (what its ``config()`` returns). A task entry that is not one of
    these (another kind, a field the task lacks, a bad value) raises a ValueError naming card.json and the field.
    """
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
                         f'"steps": 1}}, got {short_repr(config, 80)}')
    config = dict(config)
    kind = config.pop("kind", "chain-arithmetic")
    kinds = {"chain-arithmetic": ChainArithmetic, "word-problems": WordProblems}
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"{card_path}: task.kind {short_repr(kind, 80)} is not a built-in task kind; the "
                         "built-in kinds are 'chain-arithmetic' and 'word-problems' (or pass your own task: "
                         "train(cfg, task=...))")
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
