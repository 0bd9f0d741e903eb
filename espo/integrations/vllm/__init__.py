"""ESPO inside vLLM: a logits processor that draws every token with ``espo.sample``, on either model runner.

vLLM builds logits processors inside its engine process from a module path, so this package is all the
engine needs; the caller talks to it through two channels that cross processes:

* per request, ``SamplingParams(extra_args=request_args(seed, id=..., value=...))``: the rollout's seed
  (required: each token is drawn keyed by (seed, its index among the generated tokens), exactly as
  ``espo.Decoder`` draws rollout ``r`` with ``espo.rollout_seed(run_seed, r)``), a key for its stop
  record, and the critic's value of the prompt for the stop threshold (the value floor without one);
* per engine, ``LLM(..., **engine_kwargs(...))``: the processor's module path and its settings, passed as
  vLLM's ``additional_config={"espo": {...}}`` (the ESPO config, how many finished requests make one
  batch-boundary statistics update, where stop records go, the run they belong to).

``ESPOLogitsProcessor`` (the path ``engine_kwargs`` gives) builds the class of the runner the engine uses:
``ESPOLogitsProcessorMRV2`` on Model Runner V2 (vllm 0.32 to 0.34; the default from 0.33, the only runner in
0.34), ``ESPOLogitsProcessorV1`` on the V1 runner (vllm 0.32 and 0.33, async scheduling included). Other
versions are refused by ``engine_kwargs`` and by the engine, in one line saying what to install.

Each step the processor samples every request's row with ``espo.sample`` (the ESPO stop rule runs in the
same call, one ``EarlyStopper`` row per request, kept through every batch change) and forces that token:
the row becomes -inf except the drawn token, so vLLM's own sampler can only pick it, greedy or not. When
the stop fires on a token, that token is still emitted (ESPO keeps the token that triggered the stop) and
EOS is forced on the next step, which ends the request. The stop is written as one JSON line to a file
under ``record_dir`` (one file per engine process, each line naming its run); ``read_stops`` collects one
run's stops for the trainer, and ``keep_tokens`` cuts a stopped output back to the tokens the learner keeps
(without the forced EOS).

vLLM returns logprobs computed before logits processors run (``logprobs_mode="raw_logprobs"``, its
default), so a request's returned logprobs are the model's own, at temperature 1: what espo calls
``raw_logprobs``. Settings that would change or override espo's draw (penalties, min_p, n > 1,
ignore_eos, a thinking budget) are refused at submission.
"""
from __future__ import annotations

from typing import Any

from .mrv2 import ESPOLogitsProcessorMRV2
from .mrv2 import LogitsProcessor as _MRV2Base
from .records import (
    Recorder,
    RecordWarning,
    StopReader,
    StopRecord,
    clear_records,
    keep_tokens,
    read_stops,
    read_updates,
)
from .settings import (
    EXTRA_ARGS_KEY,
    MRV2_VERSIONS,
    PROCESSOR,
    RECORD_DIR_ENV,
    V1_VERSIONS,
    ProcessorSettings,
    default_record_dir,
    engine_kwargs,
    request_args,
    validate_request,
)
from .v1 import ESPOLogitsProcessorV1
from .v1 import LogitsProcessor as _V1Base

_BASES = tuple(base for base in (_V1Base, _MRV2Base) if base is not None)


class ESPOLogitsProcessor(*_BASES):  # type: ignore[misc]
    """The processor vLLM loads by ``PROCESSOR``: a subclass of both runners' processor interfaces (those this
    vLLM has), so both loaders accept it, and building it gives the class of the runner that builds it
    (``ESPOLogitsProcessorV1`` for ``(vllm_config, device, is_pin_memory)``, ``ESPOLogitsProcessorMRV2`` for
    ``(vllm_config, req_states)``)."""

    def __new__(cls, vllm_config: Any, *args: Any) -> Any:  # type: ignore[misc]
        if len(args) == 1:
            return ESPOLogitsProcessorMRV2(vllm_config, *args)
        return ESPOLogitsProcessorV1(vllm_config, *args)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse, at submission, a request the processor cannot serve (vLLM turns this into a 400)."""
        validate_request(sampling_params)


__all__ = [
    "EXTRA_ARGS_KEY",
    "MRV2_VERSIONS",
    "PROCESSOR",
    "RECORD_DIR_ENV",
    "V1_VERSIONS",
    "ESPOLogitsProcessor",
    "ESPOLogitsProcessorMRV2",
    "ESPOLogitsProcessorV1",
    "ProcessorSettings",
    "RecordWarning",
    "Recorder",
    "StopReader",
    "StopRecord",
    "clear_records",
    "default_record_dir",
    "engine_kwargs",
    "keep_tokens",
    "read_stops",
    "read_updates",
    "request_args",
]
