"""The decoder's per-slot state, both copies in one place: device buffers and their host mirrors.

Slot ``i`` holds the ``i``-th live rollout (the live slots are always the leading ones once compacted).
The decode step and its CUDA graphs read the device buffers, which therefore stay the same tensors for the
decoder's life; the scheduler reads the host mirrors, so that choosing slots never waits on the device.
Every change goes through ``admit`` / ``advance`` / ``free`` / ``compact``, which update both copies.
"""
from __future__ import annotations

import numpy as np
import torch

from .kv_cache import KVCache


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without waiting for the work queued there: on a GPU copied from pinned memory (torch
    keeps that buffer until the copy is done), as a copy from pageable memory with non_blocking=False would first wait
    for the stream, i.e. for a decode step launched ahead (``overlap_steps``). Elsewhere the array's own tensor."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Slots:
    """Per-slot decode state of ``size`` slots on ``device``.

    Device buffers [size] (what the decode step reads): ``tok`` the token to feed next; ``seqlen`` the cached
    tokens, i.e. the next token's position; ``gen`` the rollout's tokens
    generated, i.e. the next draw's offset; ``seed`` its sampling seed; ``rid`` its rollout id; ``srow`` its
    ``EarlyStopper`` row; ``pval`` its prompt's constant value. The int64 ones are the rows of one [6, size]
    tensor (``INT_FIELDS``), so that moving slots or admitting rollouts is one gather and one scatter for all six:
    host launches between two decode steps, where the GPU waits.
    Host mirrors [size] (what the scheduler reads): ``live``, ``rollout`` (-1 when free), ``length``
    (= ``seqlen``), ``stopper_row`` (-1 when free); ``free_stopper_rows`` the stopper rows no slot holds.
    """

    INT_FIELDS = ("tok", "seqlen", "gen", "seed", "rid", "srow")  # the rows of ``ints``

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device
        self.ints = torch.zeros((len(self.INT_FIELDS), size), dtype=torch.int64, device=device)
        self.tok, self.seqlen, self.gen, self.seed, self.rid, self.srow = self.ints.unbind(0)  # views of its rows
        self.pval = torch.zeros(size, dtype=torch.float32, device=device)
        self.reset()

    def reset(self) -> None:
        """Every slot free (the start of a generate call)."""
        self.live = np.zeros(self.size, dtype=bool)
        self.rollout = np.full(self.size, -1, dtype=np.int64)
        self.length = np.zeros(self.size, dtype=np.int64)
        self.stopper_row = np.full(self.size, -1, dtype=np.int64)
        self.free_stopper_rows = list(range(self.size - 1, -1, -1))
        self.moves = 0

    @property
    def n_live(self) -> int:
        return int(self.live.sum())

    def take_stopper_rows(self, k: int) -> np.ndarray:
        """``k`` free stopper rows (int64 [k]) for rollouts about to be admitted."""
        return np.array([self.free_stopper_rows.pop() for _ in range(k)], dtype=np.int64)

    def admit(self, slots: np.ndarray, rollouts: np.ndarray, lengths: np.ndarray, stopper_rows: np.ndarray,
              slots_t: torch.Tensor, admitted: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Give the free ``slots`` (``slots_t`` on the device) the rollouts ``rollouts`` whose prompts (``lengths``
        tokens) are being prefilled; ``admitted`` [5, k] int64 on the device holds, for their first draw, their
        fields but tok (set by that draw) in ``INT_FIELDS`` order: prompt length, offset 0, seed, rollout id,
        stopper row; ``values`` [k] the prompts' constant values, when there are any."""
        self.ints[1:, slots_t] = admitted
        if values is not None:
            self.pval[slots_t] = values
        self.live[slots] = True
        self.rollout[slots] = rollouts
        self.length[slots] = lengths
        self.stopper_row[slots] = stopper_rows

    def advance(self, drawn, tokens: torch.Tensor, decoded: int) -> None:
        """The slots ``drawn`` (a slice or an index tensor) drew ``tokens``; slots 0..decoded-1 cached one more."""
        self.tok[drawn] = tokens.clamp_min(0)
        self.gen[drawn] += 1
        if decoded:
            self.seqlen[:decoded] += 1
            self.length[:decoded] += 1

    def free(self, slots: np.ndarray) -> None:
        """Free the ``slots`` whose rollouts ended; their stopper rows go back to the free list."""
        self.live[slots] = False
        self.rollout[slots] = -1
        self.length[slots] = 0
        self.free_stopper_rows.extend(int(x) for x in self.stopper_row[slots])
        self.stopper_row[slots] = -1
        # padded rows of a graphed step then touch position 0 of a free slot only; index_fill_ takes 0 as a kernel
        # argument (setting an index to a Python 0 may copy it to the device first, which waits for the stream)
        self.seqlen.index_fill_(0, to_device(slots, self.device), 0)

    def compact(self, caches: list[KVCache]) -> None:
        """Move the live rollouts above the first hole down (state and the ``caches``' K/V), so that the live
        slots are 0..n_live-1."""
        n = self.n_live
        src = np.flatnonzero(self.live[n:]) + n
        if len(src) == 0:
            return
        dst = np.flatnonzero(~self.live[:n])
        length = int(self.length[src].max())
        pair = to_device(np.concatenate([src, dst]), self.device)
        src_t, dst_t = pair[: len(src)], pair[len(src) :]
        for cache in caches:
            cache.move(src_t, dst_t, length)
        self.ints[:, dst_t] = self.ints[:, src_t]
        self.pval[dst_t] = self.pval[src_t]
        self.seqlen.index_fill_(0, src_t, 0)
        for arr in (self.live, self.rollout, self.length, self.stopper_row):
            arr[dst] = arr[src]
        self.live[src] = False
        self.rollout[src], self.length[src], self.stopper_row[src] = -1, 0, -1
        self.moves += len(src)
