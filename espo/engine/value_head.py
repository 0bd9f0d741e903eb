"""Where ESPO's critic values V_t come from while decoding: the three sources of the method.

1. ``ValueHead`` on the policy's last hidden state (shared trunk): the decoder's one forward gives the
   logits and the value of the same prefix.
2. ``Critic(model, head)``: a separate transformers model (same tokenizer) stepped in lockstep with the
   policy, with its own KV cache; its last hidden state goes through ``head``.
3. A constant per prompt (critic-free, e.g. the allocator's posterior mean of the prompt's success):
   ``Decoder.generate(..., prompt_values=[...])``, held along the whole trajectory.

The value at generated position t is that of the prefix the token t is drawn from (prompt + tokens < t),
i.e. V(s_t), computed from the hidden state of the last input token: what the stop rule compares with
and what GAE needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn


class ValueHead(nn.Module):
    """A linear map from the last hidden state [..., hidden_size] to a scalar value [...] (float32).

    "Last hidden state" is the output of the model's final norm, the tensor its LM head reads
    (``model.model(ids).last_hidden_state`` in transformers).
    """

    def __init__(self, hidden_size: int, *, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"ValueHead hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.proj = nn.Linear(hidden_size, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"ValueHead expects hidden states of size {self.hidden_size}, "
                             f"got shape {tuple(hidden.shape)}")
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()


@dataclass
class Critic:
    """A separate critic: a transformers model of a supported family and the head on its last hidden state.

    ``model`` may be a causal LM (its LM head is unused) or its base model; it must read the policy's
    token ids. The decoder runs it in lockstep with the policy, one more forward per token.
    """

    model: nn.Module
    head: ValueHead

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"Critic.model must be a torch module (a transformers model), "
                            f"got {type(self.model).__name__}")
        if not isinstance(self.head, ValueHead):
            raise TypeError(f"Critic.head must be an espo.ValueHead, got {type(self.head).__name__}")


ValueSource = Union[ValueHead, Critic, None]


def check_value_source(source: object, hidden_size: int) -> ValueSource:
    """The decoder's ``value_source`` argument, checked: a ValueHead on the policy, a Critic, or None."""
    if source is None:
        return None
    if isinstance(source, ValueHead):
        if source.hidden_size != hidden_size:
            raise ValueError(
                f"the ValueHead maps hidden states of size {source.hidden_size}, but the policy's are {hidden_size}"
            )
        return source
    if isinstance(source, Critic):
        return source
    raise TypeError(
        "value_source must be an espo.ValueHead (on the policy's last hidden state), an espo.Critic(model, head) "
        f"(a separate critic), or None; got {type(source).__name__}. For a constant per prompt pass "
        "prompt_values=... to generate()"
    )


def prompt_values_tensor(values: object, num_prompts: int) -> torch.Tensor:
    """``prompt_values`` (one finite float per prompt) as a float32 CPU tensor [num_prompts]."""
    if isinstance(values, torch.Tensor):
        t = values.detach().float().flatten().cpu()
    else:
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != num_prompts:
        raise ValueError(f"prompt_values must hold one value per prompt ({num_prompts}), got {t.numel()}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("prompt_values must be finite")
    return t
