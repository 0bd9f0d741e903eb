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

import ctypes
import threading
from typing import Any, Callable

from espo.engine.tokenizer import CharTokenizer

__all__ = ["END_OF_TURN_TOKENS", "RENDER_CHARS", "RENDER_SECONDS", "encode_prompt", "stop_token_ids"]

#: a chat template that takes longer than this to render one prompt is refused (a template is data: a loop in it
#: must not hang a run)
RENDER_SECONDS = 10.0
#: nor may it render one prompt into more characters than this
RENDER_CHARS = 1_000_000


class _RenderTimeout(BaseException):
    """Raised inside the rendering thread when the render outlives RENDER_SECONDS (a BaseException, so that no
    ``except Exception`` in the template engine swallows it)."""


def _bounded_render(render: Callable[[], str]) -> str:
    """``render()``, interrupted after RENDER_SECONDS: a watchdog raises _RenderTimeout in this thread (the
    template engine runs Python, which checks for such an exception between bytecodes)."""
    target, lock, state = threading.get_ident(), threading.Lock(), {"done": False, "fired": False}

    def interrupt() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_RenderTimeout))

    watchdog = threading.Timer(RENDER_SECONDS, interrupt)
    watchdog.daemon = True
    try:
        watchdog.start()
        try:
            text = render()
        finally:
            with lock:
                state["done"] = True
                if state["fired"]:  # clear the exception if it is still pending (NULL clears it)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
            watchdog.cancel()
    except _RenderTimeout:
        text = None
    if text is None or state["fired"]:
        raise ValueError(f"the tokenizer's chat template took over {RENDER_SECONDS:g} s to render one prompt and was "
                         "stopped; a template that loops this long is broken: fix or remove chat_template in the "
                         "model's tokenizer_config.json")
    if not isinstance(text, str) or len(text) > RENDER_CHARS:
        size = f"{len(text)} characters" if isinstance(text, str) else f"a {type(text).__name__}"
        raise ValueError(f"the tokenizer's chat template rendered one prompt into {size} (at most {RENDER_CHARS} "
                         "allowed); fix chat_template in the model's tokenizer_config.json")
    return text

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
        rendered = _bounded_render(lambda: tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True))
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

    Empty when neither the model nor the tokenizer names one: completions then run to their length limit. With
    ``model``, an id outside its vocabulary (a token the tokenizer added without resizing the model) is left out:
    the model never samples it.
    """
    found: list[int] = []
    embeddings = getattr(model, "get_input_embeddings", None)
    vocab = getattr(embeddings(), "num_embeddings", None) if callable(embeddings) else None

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (vocab or v + 1) and v not in found:
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
