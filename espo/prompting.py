"""Text in and out of a model, for the built-in CharTokenizer and Hugging Face tokenizers alike (issue 22).

* :func:`encode_prompt`: a task's prompt as token ids. A tokenizer with a chat template gets the prompt as
  one user message, rendered with ``add_generation_prompt=True`` (so the model answers as the assistant);
  one without gets the plain text (with the BOS its tokenizer adds).
* :func:`stop_token_ids`: every id that ends a completion: the model's ``generation_config.eos_token_id``
  (an int or a list), the tokenizer's EOS, and the end-of-turn tokens chat models use (``<|im_end|>``,
  ``<|eot_id|>``, ``<|end|>``, ``<end_of_turn>``) when the vocabulary has them as special tokens.
* Completions are decoded with ``tokenizer.decode(ids, skip_special_tokens=True)``: the EOS and any other
  special token are dropped before a task's reward sees the text.
"""
from __future__ import annotations

from typing import Any

from .tokenizer import CharTokenizer

__all__ = ["END_OF_TURN_TOKENS", "encode_prompt", "stop_token_ids"]

#: end-of-turn tokens of common chat templates, used as stop tokens when a tokenizer has them as special tokens
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _ids(value: Any) -> list[int]:
    """Token ids from what ``apply_chat_template``/``__call__`` return across transformers versions."""
    if hasattr(value, "keys") and "input_ids" in value:
        value = value["input_ids"]
    if hasattr(value, "tolist"):
        value = value.tolist()
    value = list(value)
    if value and isinstance(value[0], (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected the ids of one prompt, got {len(value)} rows")
        value = list(value[0])
    return [int(i) for i in value]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """``text`` as the token ids a model continues: through the chat template when the tokenizer has one."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text, add_bos=True)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = _ids(tokenizer(rendered, add_special_tokens=False))  # the template writes its own BOS, if any
    elif callable(tokenizer):
        ids = _ids(tokenizer(text))
    else:
        ids = _ids(tokenizer.encode(text))
    if not ids:
        raise ValueError(f"the tokenizer turned the prompt {text[:80]!r} into no tokens; a prompt needs at least one")
    return ids


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The ids that end a completion (see the module docstring), without repeats, the tokenizer's EOS first.

    Empty when neither the model nor the tokenizer names one: completions then run to their length limit.
    """
    found: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v not in found:
                found.append(v)

    add(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        add(getattr(getattr(model, "config", None), "eos_token_id", None))
    if not isinstance(tokenizer, CharTokenizer):
        special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        special |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                    if getattr(t, "special", False)}
        for token in END_OF_TURN_TOKENS:
            if token in special:
                tid = tokenizer.convert_tokens_to_ids(token)
                add(tid if tid != getattr(tokenizer, "unk_token_id", None) else None)
    return found
