"""What espo's processor does inside vLLM's engine on either model runner: each request's sampling constants, the
EarlyStopper rows the requests hold (kept for preempted ones), the batch-boundary update, and one step's draw."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from espo.ops.backends import backends
from espo.ops.sample import sample
from espo.ops.stopper import EarlyStopper

from .records import Recorder
from .settings import SAMPLING_EPS, ProcessorSettings, RequestArgs


@dataclass(frozen=True)
class Sampling:
    """The sampling constants of one request, from its ``SamplingParams``."""

    temperature: float
    top_k: int
    top_p: float
    eos: int  # the token forced after an ESPO stop
    stop_ids: frozenset[int]  # tokens that end the request when drawn
    max_tokens: int | None
    max_len: int  # generated tokens at which the engine ends the request (max_model_len - prompt length)

    @classmethod
    def of(cls, params: Any, settings: ProcessorSettings, max_len: int) -> "Sampling":
        eos = params.eos_token_id if params.eos_token_id is not None else settings.eos_token_id
        if eos is None:
            raise ValueError(
                "espo's vLLM processor has no EOS token to end a stopped request: start the engine with the model's "
                "tokenizer, or set additional_config={'espo': {'eos_token_id': ...}}"
            )
        temperature = float(params.temperature)
        return cls(
            temperature=0.0 if temperature < SAMPLING_EPS else temperature, top_k=max(int(params.top_k or 0), 0),
            top_p=float(params.top_p), eos=int(eos),
            stop_ids=frozenset(int(t) for t in (params.all_stop_token_ids or ())) | {int(eos)},
            max_tokens=params.max_tokens, max_len=max_len,
        )

    def ends(self, index: int, token: int | None) -> bool:
        """Whether drawing ``token`` as generated token ``index`` ends the request."""
        n = index + 1
        return token in self.stop_ids or n >= self.max_len or (self.max_tokens is not None and n >= self.max_tokens)


class Drawn(Protocol):
    """What ``draw`` needs of a request."""

    args: RequestArgs
    sampling: Sampling
    srow: int | None


class StopperRows:
    """The ``EarlyStopper`` rows of one engine's requests: twice the engine's request slots, so that preempted
    requests (``parked``, by request id, oldest first) keep theirs until they come back; the statistics update
    every ``settings.update_every`` finished requests."""

    def __init__(self, settings: ProcessorSettings, slots: int, device: torch.device, recorder: Recorder,
                 events: dict[str, int]):
        self.settings, self.recorder, self.events = settings, recorder, events
        self.stopper = EarlyStopper(settings.config, batch_size=2 * slots, device=device)
        self.stopper.arm(settings.armed)
        if settings.state is not None:
            st = settings.state
            self.stopper.set_statistics(st["mean"], st["var"], st["beta"])
        self.free_rows = list(range(2 * slots - 1, -1, -1))
        self.parked: OrderedDict[str, Any] = OrderedDict()  # left the batch unfinished; each has .srow
        self.finished_since_update = 0
        self._before_last_draw = {k: torch.zeros_like(v) for k, v in self.stopper.rows.items()}

    def remember(self, srows: torch.Tensor) -> None:
        """Keep these rows as they are before a draw, for ``undo``."""
        for k, v in self.stopper.rows.items():
            self._before_last_draw[k][srows] = v[srows]

    def undo(self, srow: int) -> None:
        """Take back the row's last draw (vLLM discarded its token)."""
        for k, v in self.stopper.rows.items():
            v[srow] = self._before_last_draw[k][srow]

    def take(self) -> int:
        """A clear row (a free row's last sequence was folded when it was given back)."""
        if not self.free_rows:  # every spare row holds a preempted request: the oldest one is given up on
            _, oldest = self.parked.popitem(last=False)
            if oldest.srow is not None:
                self.fold(oldest.srow)
                oldest.srow = None
        return self.free_rows.pop()

    def fold(self, srow: int) -> None:
        """The row's sequence joins this batch's statistics; the row is free again."""
        mask = torch.zeros(self.stopper.batch_size, dtype=torch.bool)
        mask[srow] = True
        self.stopper.reset_rows(mask.to(self.stopper.device))
        self.free_rows.append(srow)

    def finish(self, srow: int) -> None:
        """A request ended: fold its row and count it towards the next statistics update."""
        self.fold(srow)
        self.finished_since_update += 1

    def update_due(self) -> bool:
        return self.finished_since_update >= self.settings.update_every

    def update_statistics(self, held: list[int]) -> None:
        """The batch-boundary update over the finished requests, leaving the ``held`` rows (live or parked
        requests) as they are; recorded with what the engine did to the batch since the last one."""
        idx = torch.tensor(held, dtype=torch.int64, device=self.stopper.device)
        saved = {k: v[idx].clone() for k, v in self.stopper.rows.items()}
        for v in self.stopper.rows.values():
            v[idx] = 0  # end_batch folds every row: these rows' sequences are not over
        report = self.stopper.end_batch()
        for k, v in self.stopper.rows.items():
            v[idx] = saved[k]
        self.recorder.write({"event": "update", "finished": self.finished_since_update, **report,
                             "batch": dict(self.events)})
        self.finished_since_update = 0
        for k in self.events:
            self.events[k] = 0


def draw(logits: torch.Tensor, rows: list[int], reqs: list[Drawn], offsets: torch.Tensor, stopper_rows: StopperRows,
         settings: ProcessorSettings) -> list[tuple[int, bool, bool, int]]:
    """Draw each request's token at its logits row with ``espo.sample`` (the ESPO stop rule in the same call),
    keyed by its seed and ``offsets`` (int64 on the logits' device: the index of the token drawn), and force it:
    the row becomes -inf except the drawn token, so vLLM's own sampler can only pick it, greedy or not.

    Returns per request (token, stop, valid, offset), read back in one device-to-host copy. A row with NaN or
    +inf logits is not espo's to sample (valid False): vLLM gets it as it was.
    """
    dev = logits.device
    rows_t = torch.tensor(rows, device=dev)
    srows = torch.tensor([r.srow for r in reqs], dtype=torch.int64, device=dev)
    values = None
    if any(r.args.value is not None for r in reqs):
        floor = settings.config.value_floor
        values = torch.tensor([floor if r.args.value is None else r.args.value for r in reqs],
                              dtype=torch.float32, device=dev)
    every_row = len(rows) == logits.shape[0] and rows == list(range(len(rows)))
    s = [r.sampling for r in reqs]
    stopper_rows.remember(srows)
    out = sample(
        logits if every_row else logits[rows_t],
        temperature=_one_or_per_row([x.temperature for x in s], torch.float32, dev),
        top_k=_one_or_per_row([x.top_k for x in s], torch.int64, dev),
        top_p=_one_or_per_row([x.top_p for x in s], torch.float32, dev),
        seed=torch.tensor([r.args.seed for r in reqs], dtype=torch.int64, device=dev),
        offset=offsets, stopper=stopper_rows.stopper, values=values, stopper_rows=srows,
        backend=settings.backend, validate=False,
    )
    forced, tokens = rows_t[out.valid], out.tokens[out.valid]
    logits[forced] = float("-inf")
    logits[forced, tokens] = 0.0
    host = torch.stack([out.tokens, out.stop.long(), out.valid.long(), offsets.long()]).tolist()
    return [(t, bool(st), bool(ok), n) for t, st, ok, n in zip(*host)]


def force_eos(logits: torch.Tensor, rows: list[int], eos: list[int]) -> None:
    """Force each row's EOS (the request was ESPO-stopped on its previous token)."""
    rows_t = torch.tensor(rows, device=logits.device)
    logits[rows_t] = float("-inf")
    logits[rows_t, torch.tensor(eos, device=logits.device)] = 0.0


def _one_or_per_row(values: list, dtype: torch.dtype, device: torch.device):
    """One Python number when every request shares it (espo.sample then decides its rule once, without a tensor
    op), else a [B] tensor."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=dtype, device=device)


def check_logits(logits: torch.Tensor, vocab_size: int) -> None:
    if logits.dim() != 2 or logits.shape[1] != vocab_size:
        raise ValueError(
            f"espo's vLLM processor got logits of shape {tuple(logits.shape)}, but the model's vocabulary has "
            f"{vocab_size} tokens: espo must see the model's full rows (no processor that trims V may run before it)"
        )


def check_device(device: torch.device, backend: str) -> None:
    """Refuse an engine where espo's sampling op cannot run, saying what would."""
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"espo's vLLM processor was loaded in an engine on {device}, but espo's kernels run on CPU and CUDA "
            "tensors only: remove espo.integrations.vllm:ESPOLogitsProcessor from logits_processors on this engine"
        )
    info = backends()
    if backend != "auto":
        if backend not in info:
            raise ValueError(f"espo settings: backend must be one of {sorted(info) + ['auto']}, got {backend!r}")
        if not info[backend].available:
            raise RuntimeError(f"espo settings ask for backend {backend!r}, which cannot run here: "
                               f"{info[backend].reason}")
        if backend != "torch" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"espo backend {backend!r} needs a CUDA engine; this one runs on {device}: "
                               "use backend 'auto'")
