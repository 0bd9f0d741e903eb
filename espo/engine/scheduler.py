"""The decoder's scheduler: which rollout runs in which slot, and when.

``Scheduler`` drives one ``generate`` call over a ``ModelRunner`` (``espo.engine.model_runner``): it keeps the
pending rollouts, admits them into free slots (one packed prefill per admission, within prefill_tokens;
eager, inside the decode step's forward; with CUDA graphs in a forward of their own once refill_batch slots
are free, and fewer inside the graphed decode step, up to refill_tokens prompt tokens), steps the live slots,
records why each rollout ended (EOS, its length limit, an ESPO stop, invalid logits), frees their slots, and
gathers the drawn tokens into ``Rollouts``. With overlap_steps it launches each decode step before it reads the
previous one's finish codes, and undoes the one extra draw of rollouts that had ended (``_read``). The slot state
itself lives in ``espo.engine.slots.Slots``; the model's compute, and the draw, in the runner.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .forward import PrefillRows
from .model_runner import ModelRunner, oom_message
from .sequence import (
    CODE_EOS,
    CODE_INVALID,
    CODE_STOP,
    FINISH_REASONS,
    RECORD_IDS,
    RECORD_VALUES,
    Admission,
    Drawn,
    RefillChunk,
    Rollout,
    Rollouts,
    RunState,
)
from .slots import to_device


class Scheduler:
    """Runs the rollouts of a ``RunState`` through the runner's ``max_batch`` slots (``runner.slots``).

    prefill_tokens: most prompt tokens prefilled in one packed forward; refill_batch, refill_tokens, overlap_steps:
    see ``espo.Decoder`` (refill_batch None: its default).
    """

    def __init__(self, runner: ModelRunner, *, prefill_tokens: int, refill_batch: int | None = None,
                 refill_tokens: int = 0, overlap_steps: bool = False):
        self.overlap_steps = bool(overlap_steps)
        self.runner, self.slots, self.device = runner, runner.slots, runner.device
        self.max_batch, self.max_seq_len, self.prefill_tokens = runner.max_batch, runner.max_seq_len, prefill_tokens
        S = self.max_batch
        default_refill = max(1, S // 8) if runner.cuda_graphs else 1
        self.refill_batch = min(S, int(refill_batch) if refill_batch is not None else default_refill)
        self.refill_tokens = int(refill_tokens)
        self._warned_chunk = False  # once per scheduler: prompts longer than the refill chunk
        if runner.cuda_graphs and self.refill_tokens and self.refill_batch > 1:
            runner.use_refill_chunk(RefillChunk(self.refill_tokens, rows=self.refill_batch - 1))

    def run(self, run: RunState, bar) -> None:
        """Decode until every rollout of ``run`` has ended, from an empty pool; ``bar`` counts finished ones."""
        self.slots.reset()
        where, slots, runner = "prefill", self.slots, self.runner
        chunk = self._chunk()
        if chunk is not None and run.plen.size and int(run.plen.max()) > chunk.tokens and not self._warned_chunk:
            self._warned_chunk = True
            warnings.warn(f"espo.Decoder: prompts of up to {int(run.plen.max())} tokens are longer than refill_tokens "
                          f"({chunk.tokens}), so their refills get a prefill forward of their own instead of riding in "
                          "the graphed decode step; pass a larger refill_tokens", RuntimeWarning, stacklevel=3)
        ahead: Drawn | None = None  # with overlap_steps: the last decode step, launched and not read yet
        try:
            while run.pending or slots.live.any() or ahead is not None:
                # Eager steps take refills into the decode step's own forward; with CUDA graphs (and when no
                # rollout is live) refills get a forward of their own once refill_batch slots are free, and fewer
                # ride in the graphed step's fixed-size refill chunk.
                alone = (runner.cuda_graphs or not slots.live.any()) and self._may_refill(run, alone=True)
                if ahead is not None and (alone or not slots.live.any()):  # read it first: its endings free slots
                    self._release(self._read(run, ahead), bar)
                    ahead = None
                elif alone:
                    where = "prefill"
                    self._release(self._admit(run), bar)
                elif slots.live.any():
                    slots.compact(runner.caches)
                    where = "decode"
                    step = self._launch(run, save_stopper=ahead is not None)
                    if ahead is not None:  # read while this step runs; its rollouts that ended there ran once more
                        self._release(self._read(run, ahead, stepped_on=True), bar)
                    if self.overlap_steps:
                        ahead = step
                    else:
                        self._release(self._read(run, step), bar)
        except torch.OutOfMemoryError as err:
            message = oom_message(where, self.max_batch, self.max_seq_len, self.prefill_tokens)
            raise torch.OutOfMemoryError(message) from err

    def _chunk(self) -> RefillChunk | None:
        """The refill chunk that graphed decode steps carry, or None (no chunk, or no CUDA graphs now)."""
        return self.runner.refill_chunk if self.runner.cuda_graphs else None

    def _may_refill(self, run: RunState, alone: bool = False) -> bool:
        """Whether to admit pending rollouts now: enough slots are free (refill_batch, or all that are pending),
        or no rollout is live. ``alone``: in a forward of their own, where, with a graphed refill chunk, fewer
        pending rollouts than refill_batch do not suffice (they ride in the next step's chunk)."""
        live = self.slots.n_live
        free = self.max_batch - live
        chunked = alone and self._chunk() is not None
        enough = self.refill_batch if chunked else min(self.refill_batch, len(run.pending))
        return bool(run.pending) and free > 0 and (live == 0 or free >= enough)

    def _take_pending(self, run: RunState, holes: np.ndarray, chunk: RefillChunk | None = None) -> Admission | None:
        """Give pending rollouts the first of the free slots ``holes`` (one packed prefill, within prefill_tokens;
        with ``chunk``, also within its tokens and rows, and packed into ``Admission.chunk`` as the smallest of the
        runner's chunk sizes that holds them).

        Sets the slots' state (prompt length, offset 0, seed, stopper row, value) for their first draw.
        """
        rids, uniq, budget, rollout_tokens = [], {}, 0, 0
        for _ in holes:
            if not run.pending:
                break
            r = run.pending[0]
            p = int(run.prompt_of[r])
            if chunk is not None:
                if len(rids) == chunk.rows or rollout_tokens + run.plen[p] > chunk.tokens:
                    break
                rollout_tokens += int(run.plen[p])
            if p not in uniq:
                if uniq and budget + run.plen[p] > self.prefill_tokens:
                    break
                uniq[p] = len(uniq)
                budget += int(run.plen[p])
            rids.append(run.pending.popleft())
        k = len(rids)
        if k == 0:
            return None
        slots = holes[:k]
        uprompts = list(uniq)
        lens = run.plen[uprompts]
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
        ids = np.concatenate([np.asarray(run.request.prompts[p], dtype=np.int64) for p in uprompts])
        positions = np.concatenate([np.arange(L, dtype=np.int64) for L in lens])
        ui = np.array([uniq[int(run.prompt_of[r])] for r in rids], dtype=np.int64)
        dst_slots = np.repeat(slots, lens[ui])
        dst_pos = np.concatenate([np.arange(lens[u], dtype=np.int64) for u in ui])
        src_idx = np.concatenate([offs[u] + np.arange(lens[u], dtype=np.int64) for u in ui])
        last_idx = offs + lens - 1
        srows = self.slots.take_stopper_rows(k)
        seeds = np.array([run.request.seeds[r] for r in rids], dtype=np.int64)
        rid_arr = np.asarray(rids, dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lens)])
        layout = None if chunk is None else self.runner.chunk_for(rollout_tokens, k)
        packed = np.zeros(0, np.int64) if layout is None else layout.pack(
            ids, positions, np.repeat(np.arange(len(lens)), lens), dst_slots, dst_pos, src_idx, last_idx[ui])
        admitted = np.stack([lens[ui], np.zeros(k, np.int64), seeds, rid_arr, srows])  # Slots.INT_FIELDS[1:]
        parts = [ids, positions, dst_slots, dst_pos, src_idx, last_idx, ui, slots, admitted.ravel(), cu, packed]
        sizes = [len(a) for a in parts]
        flat = to_device(np.concatenate(parts), self.device)  # one transfer
        ids_t, pos_t, dsl_t, dpo_t, src_t, last_t, ui_t, slots_t, admitted_t, cu_t, packed_t = torch.split(flat, sizes)

        pvals = run.request.prompt_values
        values = None if pvals is None else to_device(pvals.numpy()[run.prompt_of[rids]], self.device)
        self.slots.admit(slots, rid_arr, lens[ui], srows, slots_t, admitted_t.view(5, k), values)
        if run.request.stopper is not None:
            mask = np.zeros(self.max_batch, dtype=bool)
            mask[srows] = True
            run.request.stopper.reset_rows(to_device(mask, self.device))
        segments = [(int(o), int(L)) for o, L in zip(offs, lens)]
        prefill = PrefillRows(segments, cu_t.to(torch.int32), int(lens.max()), dsl_t, dpo_t, src_t)
        return Admission(rid_arr, slots, ids_t, pos_t, prefill, last_t, ui_t, slots_t,
                         None if layout is None else packed_t, layout)

    def _admitted(self, run: RunState, adm: Admission) -> None:
        """The admitted rollouts drew their first tokens."""
        run.prefill_tokens += int(adm.ids.shape[0])
        run.gen[adm.rids] += 1

    def _admit(self, run: RunState) -> np.ndarray:
        """Prefill pending rollouts into the lowest free slots in a forward of their own; draw their first tokens.
        Returns the slots of those that ended at once."""
        adm = self._take_pending(run, np.flatnonzero(~self.slots.live))
        logits, values = self.runner.forward(
            adm.ids, adm.positions, prefill=adm.prefill, out_idx=adm.last_idx, select=adm.ui
        )
        tokens, code = self.runner.sample(run.request, run.records, logits, values, adm.slots_t)
        self.slots.advance(adm.slots_t, tokens, decoded=0)
        self._admitted(run, adm)
        return self._read(run, Drawn(adm.rids, run.gen[adm.rids].copy(), self.runner.codes.send(code)))

    def _launch(self, run: RunState, save_stopper: bool = False) -> Drawn:
        """Launch one decode step over the live slots 0..b-1 (eager, it also prefills pending rollouts into slots
        b..b+k-1): its forward, its draw and the slots' advance, without waiting for the device. ``save_stopper``:
        keep the stopper's rows as they are before the draw (``EarlyStopper.save_rows``), for ``_read(stepped_on)``."""
        slots, runner = self.slots, self.runner
        b = slots.n_live
        need = int(slots.length[:b].max()) + 1
        length = runner.length_bucket(need)
        adm = None
        if not runner.cuda_graphs and self._may_refill(run):
            adm = self._take_pending(run, np.arange(b, self.max_batch))
        elif self._chunk() is not None and run.pending and b < self.max_batch:
            adm = self._take_pending(run, np.arange(b, self.max_batch), self._chunk())
        logits, values = runner.decode(b, length, adm)
        n = b + (0 if adm is None else len(adm.rids))
        if save_stopper and run.request.stopper is not None:
            run.request.stopper.save_rows()
        tokens, code = runner.sample(run.request, run.records, logits, values, slice(0, n))
        slots.advance(slice(0, n), tokens, decoded=b)
        run.decode_steps += 1
        run.gen[slots.rollout[:b]] += 1
        if adm is not None:
            self._admitted(run, adm)
        rids = slots.rollout[:n].copy()
        return Drawn(rids, run.gen[rids].copy(), runner.codes.send(code))

    def _read(self, run: RunState, drawn: Drawn, stepped_on: bool = False) -> np.ndarray:
        """Read the finish codes of ``drawn`` (waiting for them) and record the endings; return the slots of the
        rollouts that ended there. ``stepped_on``: a later step, launched before this read (overlap_steps), drew once
        more for them: that draw is undone where it changed state, their stopper rows restored (its records lie past
        their length and are never collected)."""
        ended = self._endings(run, drawn.rids, drawn.gen, drawn.codes())
        slots = np.flatnonzero(np.isin(self.slots.rollout, ended))
        stopper = run.request.stopper
        if stepped_on and stopper is not None and len(slots):
            stopper.restore_rows(to_device(self.slots.stopper_row[slots], self.device))
        return slots

    def _endings(self, run: RunState, rids: np.ndarray, gen: np.ndarray, code: np.ndarray) -> np.ndarray:
        """Record why the rollouts ``rids``, with ``gen`` tokens generated and finish codes ``code`` [n], ended, for
        those that did; return those. A rollout that had ended already (drawn once more by an overlapping step) is
        left as it was."""
        ended = ~run.done[rids] & ((code != 0) | (gen >= run.limit[rids]))
        for r, g, c in zip(rids[ended], gen[ended], code[ended]):
            if c & CODE_STOP:
                reason, length = "stopped", g
            elif c & CODE_INVALID:
                reason, length = "invalid", g - 1
            elif c & CODE_EOS:
                reason, length = "eos", g
            else:
                reason, length = "length", g
            run.reason[r], run.length[r] = reason, length
        run.done[rids[ended]] = True
        run.gen[rids[ended]] = gen[ended]
        return rids[ended]

    def _release(self, slots: np.ndarray, bar) -> None:
        """Free the slots of rollouts that ended."""
        if len(slots) == 0:
            return
        self.slots.free(slots)
        if bar is not None:
            bar.update(len(slots))

    def collect(self, run: RunState, elapsed: float) -> Rollouts:
        """The ended run's rollouts, in rollout-id order, with its totals (``elapsed``: its wall time)."""
        if run.records:
            ids, vals = (torch.cat(part).cpu().numpy() for part in zip(*run.records))
        else:
            ids, vals = np.zeros((0, len(RECORD_IDS)), np.int64), np.zeros((0, len(RECORD_VALUES)), np.float32)
        rid, token = range(len(RECORD_IDS))
        logprob, raw_logprob, entropy, regret, value = range(len(RECORD_VALUES))
        order = np.argsort(ids[:, rid], kind="stable")
        ids, vals = ids[order], vals[order]
        starts = np.searchsorted(ids[:, rid], np.arange(run.R))
        req = run.request
        out, counts = [], {k: 0 for k in FINISH_REASONS}
        for r in range(run.R):
            L = int(run.length[r])
            block = vals[starts[r] : starts[r] + L]
            f32 = lambda j: torch.from_numpy(block[:, j].copy())  # noqa: E731
            counts[run.reason[r]] += 1
            out.append(
                Rollout(
                    rollout_id=r,
                    prompt_index=int(run.prompt_of[r]),
                    sample_index=int(run.sample_of[r]),
                    seed=req.seeds[r],
                    tokens=torch.from_numpy(ids[starts[r] : starts[r] + L, token].copy()),
                    logprobs=f32(logprob),
                    raw_logprobs=f32(raw_logprob),
                    entropy=f32(entropy),
                    regret=f32(regret),
                    values=f32(value) if req.has_values else None,
                    finish_reason=run.reason[r],
                    length=L,
                )
            )
        return Rollouts(
            rollouts=out,
            prompts=req.prompts,
            tokens_generated=int(run.length.sum()),
            decode_steps=run.decode_steps,
            prefill_tokens=run.prefill_tokens,
            time_s=elapsed,
            seed=req.seed,
            finish_counts=counts,
            slot_moves=self.slots.moves,
        )
