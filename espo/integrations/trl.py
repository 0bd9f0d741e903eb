"""espo inside TRL's ``GRPOTrainer(rollout_func=...)``: ``espo.Decoder`` rollouts with the ESPO stop.

What TRL offers (checked against TRL 1.16): ``rollout_func(prompts, trainer) -> dict`` replaces the
trainer's generation. ``prompts`` are this process's slice of the generation batch, each prompt already
repeated ``num_generations`` times in a row, and exactly one completion per entry must come back, as
``prompt_ids``, ``completion_ids`` and ``logprobs`` (lists of lists). Other keys reach the reward functions
as keyword arguments (a list is indexed per completion), except ``env_mask``, a per-token 0/1 mask that
TRL multiplies into its loss mask. TRL counts a completion whose last token is neither an EOS nor the pad
token as clipped, and ``mask_truncated_completions=True`` drops those from the loss.

Three parts, used together:

* :class:`ESPORollout`, the ``rollout_func``. It decodes with ``espo.Decoder`` over the trainer's own
  model object, so every call samples from the current weights (the optimizer updates them in place; a
  new model object rebuilds the decoder), and a stopped row frees its slot at once. One
  ``espo.EarlyStopper`` lives across calls; its ``end_batch()`` runs once per training call. Critic-free
  GRPO has no value head, so the stop threshold's value is a per-prompt success estimate: the posterior
  mean (1 + s) / (2 + n) of a Beta(1, 1) prior after n completions of the prompt, s of them successful
  (a running mean shrunk to 1/2, what ``espo.CeroAllocator.posterior_mean`` gives without forgetting).
  Arming rule: with no critic to warm up, the stopper is armed once ``trainer.state.global_step`` reaches
  ``arm_at_step`` (default 0, as ``espo.train`` does in its critic-free modes); it can stop rows from the
  second call on, after the first ``end_batch`` has set its token statistics. Evaluation calls decode
  without the stopper.
* :meth:`ESPORollout.reward`, a reward-function wrapper: ESPO-stopped completions get ``r_fail`` and never
  reach your function; the rest get your function's reward. A stopped completion also gets one pad token
  appended with ``env_mask`` 0 (and logprob 0): TRL then counts it as terminated, neither clipped nor
  dropped by ``mask_truncated_completions``, and the appended token is in no loss.
* metrics in TRL's own logs, through the ``log_metric`` hook TRL gives reward functions: ``espo/stop_rate``,
  ``espo/rollout_tokens``, ``espo/decode_time_s``, ``espo/tokens_per_s``, ``espo/beta`` and, with
  ``measure_saved=True``, ``espo/tokens_saved`` (each stopped rollout continued from scratch with its own
  seed and no stopper, which draws the same tokens up to the stop: the tokens the stop cut; timed apart,
  as ``espo/measure_time_s``).

``logprobs`` holds the tempered log-probabilities (softmax(logits / temperature), before top-k/top-p):
TRL computes its policy log-probabilities at ``args.temperature`` over the full vocabulary, and the only
use TRL makes of the returned ones is the importance ratio against those, so tempered is the matching
kind; the raw (temperature 1) ones go to the reward functions as ``espo_raw_logprobs``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from espo.engine.decoder import Decoder, rollout_seed
from espo.ops.stopper import EarlyStopper, ESPOConfig

from ..checks import is_integer

try:
    from trl.data_utils import is_conversational
except ImportError as err:  # pragma: no cover - exercised only where TRL is absent
    raise ImportError("espo.integrations.trl needs TRL: pip install '.[trl]' in an espo-rl checkout, or "
                      "pip install 'trl>=1.16,<2' datasets accelerate") from err

__all__ = ["ESPORollout"]

_FROM_CONFIG = object()


def _tokenizer(trainer: Any) -> Any:
    processing_class = getattr(trainer, "processing_class", None)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(
            "the trainer has no tokenizer (processing_class is None): pass GRPOTrainer(processing_class="
            "AutoTokenizer.from_pretrained(...)), which ESPORollout uses to tokenize the prompts"
        )
    return tokenizer


def _check_args(trainer: Any) -> Any:
    """The trainer's GRPOConfig, refused where it asks for what espo.Decoder does not do."""
    args = trainer.args
    refused = {
        "use_vllm": (getattr(args, "use_vllm", False), "False (ESPORollout decodes with espo.Decoder)"),
        "min_p": (getattr(args, "min_p", None) is not None, "None"),
        "repetition_penalty": (getattr(args, "repetition_penalty", 1.0) not in (None, 1.0), "1.0"),
        "generation_kwargs": (bool(getattr(args, "generation_kwargs", None)), "None"),
        "tools": (bool(getattr(trainer, "tools", None)), "None (tool calls are not supported)"),
    }
    for name, (bad, fix) in refused.items():
        if bad:
            raise ValueError(f"ESPORollout does not support {name}={getattr(args, name, None)!r}: set {name}={fix}")
    if not args.temperature or args.temperature <= 0:
        raise ValueError(f"temperature must be > 0 for GRPO (TRL divides the logits by it), got {args.temperature}")
    if not args.max_completion_length:
        raise ValueError("ESPORollout needs max_completion_length (an int) in the GRPOConfig")
    return args


def _tokenize(prompts: list, trainer: Any, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt, as TRL's own generation tokenizes them."""
    if is_conversational({"prompt": prompts[0]}):
        ids = tokenizer.apply_chat_template(
            conversation=prompts, chat_template=getattr(trainer, "chat_template", None), add_generation_prompt=True,
            tokenize=True, return_dict=True, **(getattr(trainer, "chat_template_kwargs", None) or {}),
        )["input_ids"]
    else:
        ids = tokenizer(text=prompts)["input_ids"]
    ids = [list(map(int, p)) for p in ids]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(
                f"prompt {i} ({prompts[i]!r:.40}) tokenizes to no tokens: the decoder needs at least one; give the "
                "tokenizer a BOS token (add_bos_token=True) or drop empty prompts from the dataset"
            )
    return ids


def _groups(ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Runs of equal consecutive prompts as (prompt, count): the decoder prefills each prompt once."""
    unique: list[list[int]] = []
    counts: list[int] = []
    for p in ids:
        if unique and unique[-1] == p:
            counts[-1] += 1
        else:
            unique.append(p)
            counts.append(1)
    return unique, counts


def _all_reduce() -> Callable[[torch.Tensor], Any] | None:
    dist = torch.distributed
    return dist.all_reduce if dist.is_available() and dist.is_initialized() else None


class ESPORollout:
    """A ``GRPOTrainer`` ``rollout_func`` that decodes with ``espo.Decoder`` and stops rows with ESPO.

    ``rollout = ESPORollout(espo.ESPOConfig(...))``, then ``GRPOTrainer(..., rollout_func=rollout,
    reward_funcs=[rollout.reward(your_reward)])``. See the module docstring for what each part does.

    Args:
        config: the ESPO stop rule (``r_fail`` is the stopped completions' reward); default ``ESPOConfig()``.
        stop: False decodes without the stopper (the same rollouts up to the stops; for comparisons).
        arm_at_step: the training step from which stopping is on (the arming rule; 0 = from the start).
        success_threshold: a completion whose reward (from the first wrapped function) is >= this counts
            as a success for the per-prompt estimate; stopped completions count as failures.
        max_batch: the decoder's slots (rollouts decoded at once); default: the first call's completions.
        measure_saved: continue each stopped rollout without the stopper to log ``espo/tokens_saved``.
        backend: ``espo.sample``'s backend, through the decoder ("auto" picks the fastest here).
    """

    def __init__(
        self,
        config: ESPOConfig | None = None,
        *,
        stop: bool = True,
        arm_at_step: int = 0,
        success_threshold: float = 0.5,
        max_batch: int | None = None,
        measure_saved: bool = False,
    ):
        if config is not None and not isinstance(config, ESPOConfig):
            raise TypeError(f"config must be an espo.ESPOConfig, got {type(config).__name__}")
        if not is_integer(arm_at_step) or arm_at_step < 0:
            raise ValueError(f"arm_at_step must be an int >= 0, got {arm_at_step!r}")
        if max_batch is not None and (not is_integer(max_batch) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
        self.config = config if config is not None else ESPOConfig()
        self.stop, self.arm_at_step, self.success_threshold = bool(stop), arm_at_step, float(success_threshold)
        self.max_batch, self.measure_saved = max_batch, bool(measure_saved)
        self.decoder: Decoder | None = None
        self.stopper: EarlyStopper | None = None
        self.calls = 0
        self.last: dict[str, float] = {}  # the last call's metrics (what goes to TRL's logs)
        self._outcomes: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> [successes, completions]
        self._keys: list[tuple[int, ...]] = []  # the last call's prompt per completion
        self._logged_call = -1

    # ------------------------------------------------------------------------------------ the decoder

    def _decoder_for(self, trainer: Any, longest: int, rows: int, max_new: int) -> Decoder:
        """The decoder over the trainer's current model object (rebuilt if the object or the length changed)."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        need = longest + max_new
        dec = self.decoder
        if dec is None or dec.model is not model or dec.max_seq_len < need:
            slots = self.max_batch or (dec.max_batch if dec is not None else rows)
            dec = Decoder(model, max_batch=slots, max_seq_len=need)
            self.decoder = dec
            if self.stop and (self.stopper is None or self.stopper.batch_size != slots):
                self.stopper = EarlyStopper(self.config, batch_size=slots, device=dec.device)
        return dec

    def _check_rewards(self, trainer: Any) -> None:
        """Refuse a trainer that runs this rollout_func but would score stopped completions as normal endings."""
        if not self.stop or getattr(trainer, "rollout_func", None) is not self:
            return
        if not any(getattr(f, "espo_rollout", None) is self for f in getattr(trainer, "reward_funcs", [])):
            raise ValueError(
                "no reward function of this trainer is wrapped by this ESPORollout, so a stopped completion would be "
                "scored as a normal ending: pass reward_funcs=[rollout.reward(your_reward), ...]"
            )

    def success_estimate(self, prompt_ids: Sequence[int]) -> float:
        """The Beta(1, 1) posterior mean of the prompt's success rate, from the completions scored so far."""
        s, n = self._outcomes.get(tuple(prompt_ids), (0, 0))
        return (1.0 + s) / (2.0 + n)

    # ---------------------------------------------------------------------------------- rollout_func

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        if not prompts:
            raise ValueError("rollout_func got no prompts: the generation batch is empty")
        tokenizer = _tokenizer(trainer)
        args = _check_args(trainer)
        self._check_rewards(trainer)
        ids = _tokenize(list(prompts), trainer, tokenizer)
        unique, counts = _groups(ids)
        training = bool(trainer.model.training)
        max_new = int(args.max_completion_length)
        dec = self._decoder_for(trainer, max(map(len, unique)), len(ids), max_new)
        stopper = self.stopper if (self.stop and training) else None
        if stopper is not None and not stopper.armed and trainer.state.global_step >= self.arm_at_step:
            stopper.arm()
        acc = trainer.accelerator
        seed = rollout_seed(int(args.seed), self.calls * acc.num_processes + acc.process_index)
        sampling = dict(
            max_new_tokens=max_new, temperature=float(args.temperature), top_k=int(args.top_k or 0),
            top_p=float(args.top_p if args.top_p is not None else 1.0),
            eos_token_id=list(getattr(trainer, "eos_token_ids", None) or [tokenizer.eos_token_id]),
        )
        rollouts = dec.generate(
            unique, counts, seed=seed, stopper=stopper, prompt_values=[self.success_estimate(p) for p in unique],
            **sampling
        )
        report = stopper.end_batch(all_reduce=_all_reduce()) if stopper is not None else {}
        self.calls += 1
        self._keys = [tuple(p) for p in ids]
        self.last = {
            "stop_rate": rollouts.stop_rate, "rollout_tokens": float(rollouts.tokens_generated),
            "decode_time_s": rollouts.time_s, "tokens_per_s": rollouts.tokens_per_s,
        }
        if stopper is not None:
            self.last["beta"] = float(report["beta"])
        if self.measure_saved and stopper is not None:
            self.last.update(self._tokens_saved(dec, rollouts, sampling))
        return self._output(ids, rollouts, tokenizer.pad_token_id)

    @staticmethod
    def _tokens_saved(dec: Decoder, rollouts: Any, sampling: dict[str, Any]) -> dict[str, float]:
        """The tokens the stops cut: each stopped rollout redrawn with its own seed and no stopper."""
        t0 = time.perf_counter()
        stopped = [r for r in rollouts if r.finish_reason == "stopped"]
        saved = 0
        if stopped:
            full = dec.generate(
                [rollouts.prompts[r.prompt_index] for r in stopped], 1, rollout_seeds=[r.seed for r in stopped],
                **sampling
            )
            saved = sum(f.length - r.length for f, r in zip(full, stopped))
        return {"tokens_saved": float(saved), "measure_time_s": time.perf_counter() - t0}

    @staticmethod
    def _output(ids: list[list[int]], rollouts: Any, pad: int) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in (
            "prompt_ids", "completion_ids", "logprobs", "env_mask", "espo_stopped", "espo_regret", "espo_raw_logprobs")}
        for p, r in zip(ids, rollouts):
            tokens, logprobs = r.tokens.tolist(), r.logprobs.tolist()
            mask = [1] * len(tokens)
            if r.finish_reason == "stopped" or not tokens:  # a terminator TRL reads as an ending, in no loss
                tokens, logprobs, mask = tokens + [pad], logprobs + [0.0], mask + [0]
            out["prompt_ids"].append(p)
            out["completion_ids"].append(tokens)
            out["logprobs"].append(logprobs)
            out["env_mask"].append(mask)
            out["espo_stopped"].append(r.finish_reason == "stopped")
            out["espo_regret"].append(r.regret.tolist())
            out["espo_raw_logprobs"].append(r.raw_logprobs.tolist())
        return out

    # -------------------------------------------------------------------------------------- rewards

    def reward(self, reward_func: Callable[..., list], *, r_fail: Any = _FROM_CONFIG) -> Callable[..., list]:
        """Wrap a TRL reward function: stopped completions get ``r_fail``, the others ``reward_func``'s reward.

        ``r_fail`` defaults to ``config.r_fail``; None gives stopped completions None, which TRL leaves out
        of the weighted sum (with several reward functions, wrap one with the default and the rest with
        None to give a stopped completion exactly ``weight * r_fail``). The first wrapper called after a
        rollout also records each completion's success for the per-prompt estimate and logs the metrics.
        """
        if not callable(reward_func):
            raise TypeError(f"reward_func must be callable, got {type(reward_func).__name__}")
        fail = self.config.r_fail if r_fail is _FROM_CONFIG else r_fail

        def espo_reward(prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list:
            N = len(prompts)
            stopped = kwargs.get("espo_stopped") or [False] * N
            keep = [i for i in range(N) if not stopped[i]]
            rewards: list = [fail] * N
            if keep:
                pick = lambda v: [v[i] for i in keep] if isinstance(v, list) and len(v) == N else v  # noqa: E731
                got = reward_func(prompts=pick(prompts), completions=pick(completions),
                                  completion_ids=pick(completion_ids), **{k: pick(v) for k, v in kwargs.items()})
                if len(got) != len(keep):
                    raise ValueError(f"{espo_reward.__name__} returned {len(got)} rewards for {len(keep)} completions")
                for i, value in zip(keep, got):
                    rewards[i] = value
            if self._logged_call != self.calls:
                self._logged_call = self.calls
                self._record(rewards, stopped)
                log_metric = kwargs.get("log_metric")
                if callable(log_metric):
                    for name, value in self.last.items():
                        log_metric(f"espo/{name}", float(value))
            return rewards

        espo_reward.__name__ = getattr(reward_func, "__name__", type(reward_func).__name__)
        espo_reward.espo_rollout = self  # what _check_rewards looks for
        return espo_reward

    def _record(self, rewards: list, stopped: list) -> None:
        if len(rewards) != len(self._keys):
            return  # not the last rollout's completions (e.g. a reward call of its own): nothing to attribute
        for key, value, s in zip(self._keys, rewards, stopped):
            tally = self._outcomes.setdefault(key, [0, 0])
            tally[0] += int(not s and value is not None and value >= self.success_threshold)
            tally[1] += 1
