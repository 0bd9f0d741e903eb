"""espo inside transformers' ``generate``: espo draws every token, the ESPO stopper ends rows.

What ``generate`` offers (checked against transformers 5.24): no sampling hook. Custom logits processors
run after generate's own processors (repetition penalty, min length, ...) and before its sampling warpers
(temperature, top-k, top-p, which exist only with ``do_sample=True``), on the raw float32 logits of the
step. A stopping criterion runs after the step's token is appended and returns a ``(B,)`` bool tensor.
So the way in is a pair sharing one state, :class:`ESPOSampler`:

* ``sampler.logits_processor`` draws each live row's token with ``espo.sample`` (its own temperature,
  top-k and top-p; keys (rollout seed, token position), exactly as ``espo.Decoder`` draws them), runs the
  ESPO stopper, records token, logprob, raw_logprob, entropy, regret and the stop, and returns scores that
  force that token (0 for it, -inf elsewhere); ``do_sample=False`` makes generate's argmax take it.
* ``sampler.stopping_criteria`` ends the rows whose ESPO mask fired, that drew EOS, or whose logits held
  NaN/inf, and checks that generate appended the forced tokens.

``generate`` keeps computing a row after it has ended: its batch never shrinks, an ended row is padded (or,
here, forced to the pad token) until the longest row ends, so an ESPO stop saves no compute in ``generate``.
``espo.Decoder`` frees the row's slot at the step it ends. Measured once on 2 CPU cores at load 0.6
(``bench/bench_integrations_hf.py``, 2026-12-02, random Qwen2 hidden 128 x 4 layers, vocab 8192, 64 new tokens,
pool = batch, half the rows stopped after about 16, a third of the tokens): per decode step, plain generate 4.95
ms, this adapter 4.97 ms, espo.Decoder 3.84 ms at B = 16 (14.5, 11.1, 9.3 ms at B = 64); the stops save generate
7% (B = 16) and 11% (B = 64) of its time, the Decoder 8% and 26% (``bench/results/integrations-hf.md``). The
Decoder's speed against ``generate`` depends on the model and vocabulary (0.7-1.2x on a 32k-vocabulary model in
``bench/results/decode-cpu.md``); the point here is the stopped rows' compute, not speed.

:func:`generate_rollouts` calls ``generate`` with a sampler and returns ``espo.Rollouts``, the shape
``espo.Decoder.generate`` returns; with the same prompts, n, seed and settings it draws the same tokens.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Sequence, Union

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from espo.engine.decoder import Rollout, Rollouts, rollout_seed
from espo.engine.value_head import prompt_values_tensor
from espo.ops.sample import sample
from espo.ops.sampling_params import SamplingParams
from espo.ops.stopper import EarlyStopper

from ..checks import is_integer

__all__ = [
    "ESPOSampler",
    "generate_rollouts",
]

_EOS, _STOP, _INVALID = 1, 2, 4
_FIELDS = 7  # row, token, logprob, raw_logprob, entropy, regret, value

# generate's own processors (built from its generation config), and the setting that adds each one.
_SETTING_OF = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty=1.0",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty=1.0",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size=0",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size=0",
    "NoBadWordsLogitsProcessor": "bad_words_ids=None",
    "SequenceBiasLogitsProcessor": "sequence_bias=None",
    "MinLengthLogitsProcessor": "min_length=0 and min_new_tokens=None",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens=None",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn=None",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id=None",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id=None",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values=False",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty=None",
    "SuppressTokensLogitsProcessor": "suppress_tokens=None",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens=None",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale=None",
    "LogitNormalization": "renormalize_logits=False",
    "TemperatureLogitsWarper": "do_sample=False (temperature goes to ESPOSampler)",
    "TopKLogitsWarper": "do_sample=False (top_k goes to ESPOSampler)",
    "TopPLogitsWarper": "do_sample=False (top_p goes to ESPOSampler)",
}
_UNSUPPORTED_DECODING = {
    "_beam_search": "num_beams=1",
    "_assisted_decoding": "no assistant_model / prompt_lookup_num_tokens",
}


def _token_ids(value: Union[int, Sequence[int], torch.Tensor, None], name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    ids = [value] if isinstance(value, (int, np.integer)) else list(value)
    for i in ids:
        if not is_integer(i) or i < 0:
            raise ValueError(f"{name} must be token ids >= 0, got {value!r}")
    return [int(i) for i in ids]


def _running_generate(depth: int = 6) -> tuple[GenerationConfig | None, Sequence[Any] | None, str | None]:
    """The generation config and processor list of the ``generate`` call that is calling us, if any.

    ``generate`` passes neither to its processors; its decoding loop holds both as locals. Without a
    ``generate`` on the stack (a processor called by hand) this returns (None, None, None).
    """
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            break
        config = frame.f_locals.get("generation_config")
        if isinstance(config, GenerationConfig):
            return config, frame.f_locals.get("logits_processor"), frame.f_code.co_name
    return None, None, None


class _SampleAndForce(LogitsProcessor):
    """The logits-processor half of an ``ESPOSampler`` (see there)."""

    def __init__(self, sampler: "ESPOSampler"):
        self.sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.sampler._draw(input_ids, scores)


class _StopEnded(StoppingCriteria):
    """The stopping-criterion half of an ``ESPOSampler`` (see there)."""

    def __init__(self, sampler: "ESPOSampler"):
        self.sampler = sampler

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        return self.sampler._ended(input_ids)


class ESPOSampler:
    """espo's sampling and ESPO stop inside one ``generate`` call: a logits processor and a stopping criterion.

    Pass both halves and ``do_sample=False`` to ``generate`` (``model.generate(ids, **sampler.generate_kwargs(),
    max_new_tokens=...)``), then call :meth:`rollouts` for the records. Row ``i`` of the batch draws its
    k-th generated token with ``espo.sample(seed=rollout_seeds[i], offset=k)``; ``rollout_seeds`` defaults
    to ``espo.rollout_seed(seed, i)``, which is how ``espo.Decoder`` seeds rollout ``i``.

    Args:
        temperature, top_k, top_p: as in ``espo.sample`` (temperature 0 is greedy), one value for all rows;
            generate's own warpers are refused, not stacked.
        seed: the run seed of the default rollout seeds; rollout_seeds: one int64 per row instead.
        stopper: an ``espo.EarlyStopper`` with one row per batch row; its rows are reset when a generate
            call starts, and ``end_batch``/``arm`` are left to the caller, as with ``espo.Decoder``.
        values: the critic value of each row's prefix for the stop threshold, one float per row held
            constant along the row (e.g. a per-prompt success estimate); None uses the value floor.
        eos_token_id: tokens that end a row; generate's own eos ids are added when it runs with some.
        pad_token_id: the token forced into rows that have ended (default: generate's pad, else the first
            eos, else 0), so that the sequences are padded with or without ``eos_token_id``.
        vocab_size: the token ids the model can read (its input embedding's rows); logits of another
            width are refused, as they would sample ids the model cannot read or never sample some.
        backend: ``espo.sample``'s backend.

    Bad settings raise ValueError naming the one to change: ``do_sample=True``, beam search, or a
    processor that generate built from its config (repetition_penalty, min_new_tokens, ...), any of
    which would change the logits espo samples from or the token it forces.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        rollout_seeds: Sequence[int] | None = None,
        stopper: EarlyStopper | None = None,
        values: Sequence[float] | torch.Tensor | None = None,
        eos_token_id: Union[int, Sequence[int], None] = None,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        backend: str = "auto",
    ):
        if stopper is not None and not isinstance(stopper, EarlyStopper):
            raise TypeError(f"stopper must be an espo.EarlyStopper, got {type(stopper).__name__}")
        if values is not None and stopper is None:
            raise ValueError("values only feed the stop rule: pass a stopper too, or drop values")
        self.sampling = SamplingParams.shared(temperature=temperature, top_k=top_k, top_p=top_p)
        if vocab_size is not None and (not is_integer(vocab_size) or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        if not is_integer(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.rollout_seeds = None if rollout_seeds is None else [int(s) for s in rollout_seeds]
        self.stopper = stopper
        self.values = values
        self.eos_token_id = _token_ids(eos_token_id, "eos_token_id")
        self.pad_token_id = None if pad_token_id is None else _token_ids(pad_token_id, "pad_token_id")[0]
        self.vocab_size = vocab_size
        self.backend = backend
        self.logits_processor = _SampleAndForce(self)
        self.stopping_criteria = _StopEnded(self)
        self._t: int | None = None  # tokens drawn in the running call; None between calls

    def generate_kwargs(self) -> dict[str, Any]:
        """``logits_processor``, ``stopping_criteria`` and ``do_sample=False``, to splat into ``generate``."""
        return {
            "logits_processor": LogitsProcessorList([self.logits_processor]),
            "stopping_criteria": StoppingCriteriaList([self.stopping_criteria]),
            "do_sample": False,
        }

    # ------------------------------------------------------------------------------- one call's state

    def _begin(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        B, V = scores.shape
        device = scores.device
        if self.vocab_size is not None and V != self.vocab_size:
            raise ValueError(
                f"the logits have {V} columns but the model reads {self.vocab_size} token ids (vocab_size): "
                f"espo would sample ids the model {'cannot read' if V > self.vocab_size else 'never produces'}; "
                "resize the embeddings or the LM head to one width (model.resize_token_embeddings), or pass "
                f"vocab_size={V}"
            )
        self._check_generate()
        seeds = self.rollout_seeds if self.rollout_seeds is not None else [rollout_seed(self.seed, i) for i in range(B)]
        if len(seeds) != B:
            raise ValueError(f"rollout_seeds holds {len(seeds)} seeds but generate runs {B} rows: give one per row")
        self._seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self._values = None
        if self.stopper is not None:
            if self.stopper.batch_size != B:
                raise ValueError(
                    f"stopper.batch_size ({self.stopper.batch_size}) must equal generate's batch ({B} rows: one "
                    "per input_ids row; with do_sample=False generate refuses num_return_sequences > 1, so repeat "
                    "each prompt n times in input_ids, as espo.integrations.transformers.generate_rollouts does): "
                    "build it as espo.EarlyStopper(config, batch_size=B)"
                )
            if self.stopper.device != device:
                raise ValueError(f"the stopper lives on {self.stopper.device}, the logits on {device}: build it there")
            if self.values is not None:
                values = torch.as_tensor(self.values, dtype=torch.float32).to(device).flatten()
                if values.shape != (B,):
                    raise ValueError(f"values holds {values.numel()} floats but generate runs {B} rows: "
                                     "give one per row")
                self._values = values
            self.stopper.reset_rows(torch.ones(B, dtype=torch.bool, device=device))
        self._eos = torch.tensor(self.eos_token_id, dtype=torch.int64, device=device) if self.eos_token_id else None
        pad = self.pad_token_id if self.pad_token_id is not None else self._generate_pad
        if pad is None:
            pad = self.eos_token_id[0] if self.eos_token_id else 0
        self._pad = int(pad)
        self._prompt_ids = input_ids.detach().cpu()
        self._width0 = input_ids.shape[1]
        self._t = 0
        self._live = np.ones(B, dtype=bool)
        self._live_idx = torch.arange(B, device=device)
        self._length = np.zeros(B, dtype=np.int64)
        self._reason = [""] * B
        self._records: list[torch.Tensor] = []
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._t0 = time.perf_counter()

    def _check_generate(self) -> None:
        """Refuse a ``generate`` call whose settings would change what espo samples or forces."""
        self._generate_pad = None
        config, processors, method = _running_generate()
        if config is None:
            return
        if method in _UNSUPPORTED_DECODING:
            raise ValueError(f"ESPOSampler runs in greedy/sample decoding only: pass {_UNSUPPORTED_DECODING[method]}")
        if config.do_sample:
            raise ValueError(
                "generate runs with do_sample=True: pass do_sample=False (espo draws the token itself and forces "
                "it; give temperature, top_k and top_p to ESPOSampler)"
            )
        for p in processors or []:
            if p is self.logits_processor or not type(p).__module__.startswith("transformers."):
                continue
            setting = _SETTING_OF.get(type(p).__name__, f"the setting that adds {type(p).__name__}")
            raise ValueError(
                f"generate applies {type(p).__name__}, which changes the logits espo samples from or the token "
                f"it forces: pass {setting} to generate (or set it in model.generation_config)"
            )
        eos = _token_ids(getattr(config, "_eos_token_tensor", None), "eos_token_id")
        self.eos_token_id = self.eos_token_id + [e for e in eos if e not in self.eos_token_id]
        pad = getattr(config, "_pad_token_tensor", None)
        self._generate_pad = int(pad) if pad is not None else None

    def _draw(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2 or input_ids.dim() != 2 or scores.shape[0] != input_ids.shape[0]:
            raise ValueError(f"expected input_ids [B, L] and scores [B, V], got {tuple(input_ids.shape)} "
                             f"and {tuple(scores.shape)}")
        if self._t is None:
            self._begin(input_ids, scores)
        elif self._pending is not None:
            raise RuntimeError("ESPOSampler.stopping_criteria was not called after the last step: "
                               "pass it to generate too")
        elif input_ids.shape[1] != self._width0 + self._t or scores.shape[0] != len(self._live):
            raise RuntimeError(
                f"this ESPOSampler is in the middle of a generate call ({self._t} tokens drawn for {len(self._live)} "
                "rows): call sampler.rollouts() to close it before the next generate, or use one sampler per call"
            )
        idx = self._live_idx
        all_live = bool(self._live.all())
        stopper = self.stopper
        seeds = self._seeds if all_live else self._seeds[idx]
        out = sample(
            scores if all_live else scores[idx], params=self.sampling.with_seed(seeds), offset=self._t, stopper=stopper,
            values=None if self._values is None else (self._values if all_live else self._values[idx]),
            stopper_rows=None if stopper is None or all_live else idx, backend=self.backend, validate=False,
        )
        vals = self._values[idx] if self._values is not None else torch.zeros_like(out.logprobs)
        self._records.append(torch.stack(
            [idx.double(), out.tokens.double(), out.logprobs.double(), out.raw_logprobs.double(),
             out.entropy.double(), out.regret.double(), vals.double()], dim=1,
        ))
        code = (~out.valid).to(torch.uint8) * _INVALID
        if self._eos is not None:
            code |= torch.isin(out.tokens, self._eos).to(torch.uint8) * _EOS
        if out.stop is not None:
            code |= out.stop.to(torch.uint8) * _STOP
        forced = torch.full((scores.shape[0],), self._pad, dtype=torch.int64, device=scores.device)
        forced[idx] = torch.where(out.valid, out.tokens, self._pad)
        self._pending = (forced, code)
        return torch.full_like(scores, float("-inf")).scatter_(1, forced[:, None], 0.0)

    def _ended(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("ESPOSampler.logits_processor did not run this step: pass it to generate too")
        forced, code = self._pending
        self._pending = None
        idx = self._live_idx
        appended = input_ids[:, -1]
        if not bool((appended[idx] == forced[idx]).all()):
            raise RuntimeError(
                "generate appended other tokens than the ones espo forced: pass do_sample=False and no processor "
                "that runs after ESPOSampler.logits_processor"
            )
        code = code.cpu().numpy()  # the one host sync of the step
        rows = idx.cpu().numpy()
        self._t += 1
        ended = code != 0
        for r, c in zip(rows[ended], code[ended]):
            reason = "stopped" if c & _STOP else "invalid" if c & _INVALID else "eos"
            self._reason[r] = reason
            self._length[r] = self._t - 1 if reason == "invalid" else self._t
        self._live[rows[ended]] = False
        if ended.any():
            self._live_idx = torch.from_numpy(np.flatnonzero(self._live)).to(input_ids.device)
        return torch.from_numpy(~self._live).to(input_ids.device)

    # --------------------------------------------------------------------------------------- results

    def rollouts(self, prompts: Sequence[Sequence[int]] | None = None, n: int = 1) -> Rollouts:
        """Close the call and return its records as ``espo.Rollouts`` (rollout i = batch row i).

        ``prompts`` (the unpadded prompts, one per group of ``n`` rows) fill ``Rollouts.prompts``; without
        them each row's padded input is kept. Rows still running when generate returned end "length".
        """
        if self._t is None:
            raise RuntimeError("ESPOSampler.rollouts(): no generate call has run through this sampler "
                               "since the last one")
        B = len(self._live)
        if prompts is not None and len(prompts) * n != B:
            raise ValueError(f"{len(prompts)} prompts x n={n} != the {B} rows generate ran")
        for r in np.flatnonzero(self._live):
            self._reason[r], self._length[r] = "length", self._t
        rec = torch.cat(self._records).cpu().numpy() if self._records else np.zeros((0, _FIELDS))
        rec = rec[np.argsort(rec[:, 0], kind="stable")]  # row-major, steps in order within a row
        starts = np.searchsorted(rec[:, 0], np.arange(B))
        counts: dict[str, int] = {k: 0 for k in ("eos", "length", "stopped", "invalid")}
        out = []
        for r in range(B):
            block = rec[starts[r]: starts[r] + self._length[r]]
            f32 = lambda j: torch.from_numpy(block[:, j].astype(np.float32))  # noqa: E731
            counts[self._reason[r]] += 1
            out.append(Rollout(
                rollout_id=r, prompt_index=r // n, sample_index=r % n, seed=int(self._seeds[r]),
                tokens=torch.from_numpy(block[:, 1].astype(np.int64)), logprobs=f32(2), raw_logprobs=f32(3),
                entropy=f32(4), regret=f32(5), values=f32(6) if self._values is not None else None,
                finish_reason=self._reason[r], length=int(self._length[r]),
            ))
        plist = [list(p) for p in prompts] if prompts is not None else self._prompt_ids.tolist()
        result = Rollouts(
            rollouts=out, prompts=plist, tokens_generated=int(self._length.sum()), decode_steps=max(self._t - 1, 0),
            prefill_tokens=B * self._width0, time_s=time.perf_counter() - self._t0, seed=self.seed,
            finish_counts=counts,
        )
        self._t = None
        return result


def _left_pad(prompts: list[list[int]], n: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts) * n, width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        rows = slice(i * n, (i + 1) * n)
        ids[rows, width - len(p):] = torch.tensor(p, dtype=torch.int64)
        mask[rows, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of prompts, each a list of token ids")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise TypeError(f"prompt {i} is a string: tokenize it first (generate_rollouts takes token ids)")
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
        if any(not is_integer(t) or not 0 <= t < vocab for t in p):
            raise ValueError(f"prompt {i} must hold int token ids in [0, {vocab}), got {p[:8]}")
        out.append([int(t) for t in p])
    return out


def generate_rollouts(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    n: int = 1,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stopper: EarlyStopper | None = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: int | None = None,
    prompt_values: Sequence[float] | None = None,
    rollout_seeds: Sequence[int] | None = None,
    backend: str = "auto",
    **generate_kwargs: Any,
) -> Rollouts:
    """``n`` rollouts of each prompt (token-id lists) with ``model.generate`` and an :class:`ESPOSampler`.

    Arguments mean what they mean in ``espo.Decoder.generate``, and the result has its shape: rollout ids
    are prompt-major, ``Rollout.tokens`` ends with the EOS or the token that triggered the stop, and the
    same seed draws the same tokens as the Decoder in float32 (in bfloat16 and float16 the two forwards round
    differently, and rows part after some tokens). ``stopper`` needs ``len(prompts) * n`` rows.
    ``eos_token_id`` defaults to the model's generation config. Other keyword arguments go to
    ``generate``; ``do_sample=True``, beam search and processors that change the logits are refused.

    ``generate`` keeps computing a stopped row until the longest row ends; ``espo.Decoder`` frees it.
    """
    if not is_integer(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for name in ("logits_processor", "stopping_criteria"):
        if name in generate_kwargs:
            raise ValueError(f"generate_rollouts builds {name} itself; use ESPOSampler with generate to add your own")
    if generate_kwargs.get("do_sample"):
        raise ValueError("do_sample=True: espo draws the token itself; drop do_sample "
                         "(temperature/top_k/top_p are arguments here)")
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"num_beams={generate_kwargs['num_beams']}: espo samples one token per row; pass num_beams=1")
    vocab = model.get_input_embeddings().num_embeddings
    width = model.get_output_embeddings().out_features
    if width != vocab:
        raise ValueError(
            f"the model's LM head has {width} outputs but its input embedding reads {vocab} token ids: espo would "
            f"{'sample ids the model cannot read' if width > vocab else 'never sample some ids'}; give both one width "
            f"(model.resize_token_embeddings({max(width, vocab)}))"
        )
    plist = _check_prompts(prompts, vocab)
    gc = getattr(model, "generation_config", None)
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gc, "eos_token_id", None), "eos_token_id")
    outside = [e for e in eos if e >= vocab] if eos_token_id is not None else []
    if outside:
        raise ValueError(f"eos_token_id {outside[0]} is outside the model's vocabulary [0, {vocab}): no rollout could "
                         "end with it; pass ids of the model's own end tokens")
    if pad_token_id is None:
        pad_token_id = getattr(gc, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    values = None
    if prompt_values is not None:
        values = prompt_values_tensor(prompt_values, len(plist)).repeat_interleave(int(n))  # Decoder.generate's check
    sampler = ESPOSampler(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, rollout_seeds=rollout_seeds, stopper=stopper,
        values=values, eos_token_id=eos, pad_token_id=pad_token_id, vocab_size=vocab, backend=backend,
    )
    device = next(model.parameters()).device
    ids, mask = _left_pad(plist, int(n), int(pad_token_id), device)
    t0 = time.perf_counter()
    model.generate(
        ids, attention_mask=mask, max_new_tokens=int(max_new_tokens), eos_token_id=eos or None,
        pad_token_id=int(pad_token_id), **sampler.generate_kwargs(), **generate_kwargs,
    )
    rollouts = sampler.rollouts(plist, int(n))
    rollouts.time_s = time.perf_counter() - t0
    return rollouts
