"""What a generate call carries through the engine: its request, its progress, its admissions, its results.

The leaf of ``espo.engine``: the decoder builds a ``Request`` and a ``RunState``, the scheduler admits rollouts
(``Admission``) and reads each drawn token's finish code, the model runner draws the tokens and writes their
records, and the scheduler gathers them into ``Rollouts``. Every part imports these from here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from espo.ops.sampling_params import SamplingParams
from espo.ops.stopper import EarlyStopper

from .forward import PrefillRows

FINISH_REASONS = ("eos", "length", "stopped", "invalid")

# Finish codes of a drawn token (bits): it is an EOS, the stopper stopped its row, its logits were not finite.
CODE_EOS, CODE_STOP, CODE_INVALID = 1, 2, 4

# One row per drawn token, in this column order: the ids (int64) and the values (float32) of a record.
RECORD_IDS = ("rollout_id", "token")
RECORD_VALUES = ("logprob", "raw_logprob", "entropy", "regret", "value")


@dataclass
class Request:
    """``generate``'s inputs, checked.

    prompts: P token-id lists; counts: rollouts per prompt [P]; sampling: temperature, top-k and top-p, one for
    every rollout (its seed is replaced at each draw by the slots' own, ``SamplingParams.with_seed``); seed: the
    run seed; seeds: each rollout's sampling seed [R]; eos: the EOS ids on the device, or None; prompt_values:
    [P] constant values, or None; has_values: the rollouts carry values (from the decoder's value source or
    ``prompt_values``).
    """

    prompts: list[list[int]]
    counts: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    seeds: list[int]
    stopper: EarlyStopper | None
    eos: torch.Tensor | None
    prompt_values: torch.Tensor | None
    has_values: bool


@dataclass
class RunState:
    """The host-side progress of one generate call, per rollout [R] (ids in prompt-major order).

    prompt_of, sample_of: each rollout's prompt and its index among that prompt's rollouts; plen: prompt
    lengths [P]; limit: the most tokens each may generate; gen: tokens generated so far; length, reason:
    set when it ends; pending: rollouts not yet admitted; records: per draw, the ids [k, len(RECORD_IDS)] (int64)
    and values [k, len(RECORD_VALUES)] (float32) of its k tokens.
    """

    request: Request
    prompt_of: np.ndarray
    sample_of: np.ndarray
    plen: np.ndarray
    limit: np.ndarray
    gen: np.ndarray
    length: np.ndarray
    reason: list[str]
    done: np.ndarray
    pending: deque
    records: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    decode_steps: int = 0
    prefill_tokens: int = 0

    @property
    def R(self) -> int:
        return len(self.reason)

    @classmethod
    def of(cls, request: Request, max_seq_len: int) -> "RunState":
        counts = request.counts
        R, P = sum(counts), len(counts)
        prompt_of = np.repeat(np.arange(P, dtype=np.int64), counts)
        plen = np.array([len(p) for p in request.prompts], dtype=np.int64)
        return cls(
            request=request,
            prompt_of=prompt_of,
            sample_of=np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if P else np.zeros(0, np.int64),
            plen=plen,
            limit=np.minimum(request.max_new_tokens, max_seq_len - plen[prompt_of]) if R else np.zeros(0, np.int64),
            gen=np.zeros(R, dtype=np.int64),
            length=np.zeros(R, dtype=np.int64),
            reason=[""] * R,
            done=np.zeros(R, dtype=bool),
            pending=deque(range(R)),
        )


@dataclass
class Drawn:
    """Rows whose tokens a step has drawn on the device, before the host has read their finish codes.

    rids, gen [n]: each row's rollout and its tokens generated, this draw included; codes(): the rows' finish codes
    (uint8 [n], ``CODE_*`` bits), waiting for the device's copy where it has not arrived yet.
    """

    rids: np.ndarray
    gen: np.ndarray
    codes: Callable[[], np.ndarray]


@dataclass
class Admission:
    """Pending rollouts given free slots: their packed prompts (each prompt once) and where each one's K/V go.

    rids, slots [k]: the rollouts and their slots (host); ids, positions [N]: the packed prompt tokens;
    last_idx [U]: each prompt's last token in them; ui [k]: each rollout's prompt among the U; slots_t [k]:
    the slots on the device. chunk: the same admission padded to a fixed size (``RefillChunk.pack`` of
    ``chunk_layout``, on the device), for a CUDA graph's decode step to prefill it, or None.
    """

    rids: np.ndarray
    slots: np.ndarray
    ids: torch.Tensor
    positions: torch.Tensor
    prefill: PrefillRows
    last_idx: torch.Tensor
    ui: torch.Tensor
    slots_t: torch.Tensor
    chunk: torch.Tensor | None = None
    chunk_layout: "RefillChunk | None" = None


class RefillChunk:
    """An admission padded to ``tokens`` prompt tokens and ``rows`` rollouts, as one int64 array, so that a CUDA
    graph's decode step can prefill it from a static buffer: the packed prompts' ids, positions and prompt ids
    (seg), where each rollout's K/V go (dst_slots, dst_pos, src_idx: one entry per rollout and token) and each
    rollout's last prompt token (out). Padding tokens are token 0 at position 0 with a prompt id of their own;
    padding K/V writes and outputs repeat the first real ones (the same value written twice)."""

    FIELDS = ("ids", "positions", "seg", "dst_slots", "dst_pos", "src_idx")

    def __init__(self, tokens: int, rows: int):
        self.tokens, self.rows = tokens, min(rows, tokens)  # a rollout has at least one prompt token

    def sizes(self, smallest: int = 32) -> list["RefillChunk"]:
        """This chunk and its halvings down to ``smallest`` tokens, smallest first: a refill rides in the smallest
        that fits it, so that one short prompt does not cost the compute of the whole chunk."""
        tokens = [self.tokens]
        while tokens[-1] // 2 >= smallest:
            tokens.append(tokens[-1] // 2)
        return [RefillChunk(t, self.rows) for t in reversed(tokens)]

    def fits(self, tokens: int, rows: int) -> bool:
        return tokens <= self.tokens and rows <= self.rows

    @property
    def size(self) -> int:
        return len(self.FIELDS) * self.tokens + self.rows

    def pack(self, ids, positions, seg, dst_slots, dst_pos, src_idx, out) -> np.ndarray:
        """The padded array (host int64); raises ValueError if the admission does not fit."""
        n, d, k = len(ids), len(dst_slots), len(out)
        if n > self.tokens or d > self.tokens or k > self.rows or min(n, d, k) == 0:
            raise ValueError(f"a refill chunk holds 1..{self.tokens} tokens and 1..{self.rows} rollouts, got {n} "
                             f"prompt tokens, {d} rollout tokens and {k} rollouts")
        flat = np.zeros(self.size, dtype=np.int64)
        T = self.tokens
        flat[0:n], flat[T : T + n] = ids, positions
        flat[2 * T : 3 * T] = int(seg.max()) + 1
        flat[2 * T : 2 * T + n] = seg
        for j, (a, first) in enumerate(((dst_slots, dst_slots[0]), (dst_pos, dst_pos[0]), (src_idx, src_idx[0]))):
            flat[(3 + j) * T : (4 + j) * T] = first
            flat[(3 + j) * T : (3 + j) * T + d] = a
        flat[6 * T :] = out[0]
        flat[6 * T : 6 * T + k] = out
        return flat

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields of a packed buffer (views of it, e.g. a CUDA graph's static input), and "out"."""
        T = self.tokens
        named = {name: buf[i * T : (i + 1) * T] for i, name in enumerate(self.FIELDS)}
        named["out"] = buf[len(self.FIELDS) * T :]
        return named


@dataclass
class Rollout:
    """One generated continuation.

    tokens: int64 [length], the generated tokens (an EOS that ended the rollout included; for a stopped
        rollout, the token that triggered the stop included).
    logprobs: float32 [length], under the tempered distribution; raw_logprobs: at temperature 1.
    entropy, regret: float32 [length], of the tempered distribution at each step.
    values: float32 [length] or None: V of the prefix each token was drawn from (prompt + tokens before it),
        from the decoder's value source or the prompt's constant; None without one.
    finish_reason: "eos", "length" (max_new_tokens or max_seq_len reached), "stopped" (ESPO; wins over eos
        and length at the same token, as the stopper counted it), or "invalid" (the model produced NaN/inf
        logits; the step is not kept).
    """

    rollout_id: int
    prompt_index: int
    sample_index: int
    seed: int
    tokens: torch.Tensor
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor
    entropy: torch.Tensor
    regret: torch.Tensor
    values: torch.Tensor | None
    finish_reason: str
    length: int


@dataclass
class Rollouts:
    """The rollouts of one ``generate`` call, in rollout-id order (prompt-major), with run totals."""

    rollouts: list[Rollout]
    prompts: list[list[int]]
    tokens_generated: int
    decode_steps: int
    prefill_tokens: int
    time_s: float
    seed: int
    finish_counts: dict[str, int] = field(default_factory=dict)
    slot_moves: int = 0  # live rollouts moved down into a freed slot (the live slots stay leading)

    def __len__(self) -> int:
        return len(self.rollouts)

    def __iter__(self) -> Iterator[Rollout]:
        return iter(self.rollouts)

    def __getitem__(self, i: int) -> Rollout:
        return self.rollouts[i]

    def for_prompt(self, prompt_index: int) -> list[Rollout]:
        """The rollouts of one prompt, in sample order."""
        return [r for r in self.rollouts if r.prompt_index == prompt_index]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.time_s if self.time_s > 0 else float("nan")

    @property
    def stop_rate(self) -> float:
        return self.finish_counts.get("stopped", 0) / len(self.rollouts) if self.rollouts else 0.0
