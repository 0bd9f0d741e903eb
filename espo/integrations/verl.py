"""ESPO in verl: the critic-free advantage estimator, the absorbing-failure GAE, and an agent loop.

Importing this module registers, in verl's registries of the importing process,

* the advantage estimator ``"espo_grpo"`` (``algorithm.adv_estimator=espo_grpo``): group-normalised
  outcome advantages in which an ESPO-stopped response's outcome is ``r_fail``;
* the agent loop ``"espo_agent"`` (``ESPOAgentLoop``): verl's single-turn loop, with each request seeded
  for espo's vLLM processor, and each stopped rollout cut back to the token that triggered its stop and
  given the reward ``r_fail``.

verl imports it in every process (driver, agent-loop and rollout workers) when its environment holds
``VERL_USE_EXTERNAL_MODULES=espo.integrations.verl``; ``examples/verl_espo.yaml`` is the whole config.

How a stop reaches the advantage. verl's ``compute_advantage`` hands a registered estimator only
``token_level_rewards``, ``response_mask``, ``config``, ``index`` (the group uid) and, when the batch has
it, ``reward_baselines``; verl's v1 trainer even reads back only rewards, masks, log-probs and values
before it. So a stop travels as ESPO defines it, as the reward: the stopped rollout ends at the token
that triggered the stop, which carries ``r_fail`` (an absorbing failure), while a rollout cut by the
length limit keeps its task reward. ``ESPOAgentLoop`` writes it where rollouts come from the vLLM
processor; ``mark_stops`` writes it into a ``DataProto`` whose batch carries the flag ``espo_stopped``
(a custom rollout or reward pipeline).

Actor-critic ESPO: ``espo_gae`` is verl's ``compute_gae_advantage_return`` (same arguments, and the same results
on response tokens; 0 at masked positions) vectorised over time, with optional stops. verl calls its GAE
directly (``"gae"`` is not looked up in the registry), so it is swapped in by one line,
``core_algos.compute_gae_advantage_return = espo_gae``, which ``use_espo_gae()`` does (and this module's import
does when ``ESPO_VERL_GAE=1``).
"""
from __future__ import annotations

import json
import os
import secrets
from typing import Any, Sequence

import numpy as np
import torch

from espo.ops.stopper import ESPOConfig
from espo.rl.advantages import group_advantages, response_gae

from .vllm import EXTRA_ARGS_KEY, StopReader, StopRecord, default_record_dir, request_args

try:
    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.trainer.ppo import core_algos
    from verl.utils import torch_functional as verl_F
    from verl.workers.rollout.replica import TokenOutput
except ImportError as err:  # pragma: no cover - exercised only without verl
    raise ImportError("espo.integrations.verl needs verl: pip install verl "
                      "(see README, 'Embedding')") from err

ESTIMATOR = "espo_grpo"
AGENT_LOOP = "espo_agent"
STOP_FLAG = "espo_stopped"
STOP_INDEX = "espo_stop_index"
R_FAIL = ESPOConfig().r_fail


# -------------------------------------------------------------------------------- critic-free: GRPO


def _outcomes(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards and response_mask must share one [B, T] shape, "
            f"got {tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}"
        )
    return token_level_rewards.sum(dim=-1)


def _group_ids(index: Any, B: int) -> torch.Tensor:
    if index is None:
        raise ValueError(
            f"{ESTIMATOR} groups responses by prompt: verl passes data.non_tensor_batch['uid'] as index; "
            "the batch has no 'uid' (set one uid per prompt, repeated for its rollouts)"
        )
    ids = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)[1]
    if len(ids) != B:
        raise ValueError(f"index has {len(ids)} entries for {B} responses: one uid per response is needed")
    return torch.from_numpy(ids.astype(np.int64))


def espo_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    *,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    espo_stopped: torch.Tensor | Sequence[bool] | None = None,
    r_fail: float = R_FAIL,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic-free ESPO: each response's advantage is its outcome minus its group's mean, over the std.

    Registered in verl as ``"espo_grpo"``. A response's outcome is the sum of its token rewards; a stopped
    one's is ``r_fail``, written into its rewards by ``ESPOAgentLoop`` or ``mark_stops`` (the way verl's
    ``compute_advantage`` delivers it), or set here from ``espo_stopped`` (bool [B]) in a direct call.
    The std is the group's population std (as in ``espo.rl.advantages.group_advantages``), where verl's own
    ``grpo`` divides by the sample std (``torch.std``): a factor sqrt(n / (n - 1)) apart for groups of n
    (1.15 at n = 4, 1.03 at n = 16), which changes the advantages' scale, not their signs or order; without
    ``norm_adv_by_std_in_grpo`` (default: ``config.norm_adv_by_std_in_grpo``, else True) the centred
    outcome is used. Returns (advantages, returns), both the advantage broadcast over ``response_mask``.
    """
    outcomes = _outcomes(token_level_rewards, response_mask).double()
    if espo_stopped is not None:
        stopped = torch.as_tensor(espo_stopped, dtype=torch.bool, device=outcomes.device)
        if stopped.shape != outcomes.shape:
            raise ValueError(f"espo_stopped must hold one bool per response ({outcomes.numel()}), "
                             f"got shape {tuple(stopped.shape)}")
        outcomes = torch.where(stopped, torch.full_like(outcomes, r_fail), outcomes)
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(config.get("norm_adv_by_std_in_grpo", True)) if config is not None else True
    groups = _group_ids(index, outcomes.numel()).to(outcomes.device)
    adv = group_advantages(outcomes, groups, eps=epsilon, scale=norm_adv_by_std_in_grpo)
    scores = adv.to(token_level_rewards.dtype)[:, None] * response_mask.to(token_level_rewards.dtype)
    return scores, scores


def _stop_flags(data: "DataProto", key: str) -> torch.Tensor:
    if key in data.batch.keys():
        flags = data.batch[key]
    elif key in data.non_tensor_batch:
        flags = data.non_tensor_batch[key]
    else:
        raise ValueError(
            f"the batch has no stop flag {key!r}: set data.non_tensor_batch[{key!r}] (one bool per response, True "
            "where ESPO stopped it; espo.integrations.vllm.read_stops says which), or roll out with the "
            "'espo_agent' loop, which writes r_fail into the rewards itself"
        )
    flags = torch.as_tensor(np.asarray(flags, dtype=bool))
    if flags.shape != (len(data),):
        raise ValueError(f"{key!r} must hold one bool per response ({len(data)}), got shape {tuple(flags.shape)}")
    return flags


def mark_stops(data: "DataProto", *, r_fail: float = R_FAIL, key: str = STOP_FLAG,
               reward_key: str | None = None) -> "DataProto":
    """Give each ESPO-stopped response of ``data`` the outcome ``r_fail``, in place; return ``data``.

    The flag ``data.non_tensor_batch[key]`` (or ``data.batch[key]``) says which responses ESPO stopped;
    their reward row (``reward_key``: default the first of ``token_level_scores``, ``rm_scores``,
    ``token_level_rewards`` in the batch) becomes ``r_fail`` at their last response token and 0 elsewhere.
    Responses cut by the length limit are not stopped: their task reward stays.
    """
    flags = _stop_flags(data, key)
    if reward_key is None:
        reward_key = next((k for k in ("token_level_scores", "rm_scores", "token_level_rewards")
                           if k in data.batch.keys()), None)
        if reward_key is None:
            raise ValueError("the batch has no reward row to mark "
                             "(token_level_scores, rm_scores or token_level_rewards)")
    rewards, mask = data.batch[reward_key], data.batch["response_mask"]
    last = _last_index(mask)
    rows = torch.nonzero(flags.to(rewards.device)).flatten()
    rewards[rows] = 0
    rewards[rows, last[rows]] = r_fail
    return data


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """The index of each row's last real token (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).amax(dim=1)


# ----------------------------------------------------------------------------- actor-critic: the GAE


def espo_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    stop_index: torch.Tensor | None = None,
    r_fail: float | None = None,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_gae_advantage_return``, vectorised (``espo.rl.advantages.response_gae``), with absorbing stops.

    Same arguments as verl's, and the same results on the response tokens: advantages (whitened over
    ``response_mask`` unless ``whiten=False``) and returns = advantages + values, before whitening; masked-out
    tokens inside a response (a multi-turn loop's tool output) are skipped, as verl skips them. At masked
    positions (those holes and padding) it writes 0 where verl leaves its running estimate (the losses mask them).
    ``stop_index`` (int [B], -1 where a row was not stopped) ends a row at its stop: tokens after it leave the
    mask and nothing is bootstrapped past it; with ``r_fail`` the stop token's reward becomes ``r_fail`` and every
    token before it keeps its own reward (a per-token KL penalty, say).
    """
    advantages, returns, mask = response_gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam,
                                             stop_index=stop_index, r_fail=r_fail)
    if whiten:
        with torch.no_grad():
            advantages = verl_F.masked_whiten(advantages, mask) * mask
    return advantages, returns


def use_espo_gae() -> None:
    """Make verl's trainer call ``espo_gae`` where it calls its own GAE (the one-line patch, in this process)."""
    core_algos.compute_gae_advantage_return = espo_gae


# ------------------------------------------------------------------------------------- the agent loop


def cut_at_stop(output: "TokenOutput", stop: StopRecord | None) -> "TokenOutput":
    """One engine answer cut back to what the learner keeps, in place; return it.

    A stopped rollout keeps its tokens up to and including the one that triggered the stop; the EOS the
    engine forced after it is not the policy's choice and is dropped, with its logprob.
    """
    if stop is None:
        return output
    keep = stop.index + 1
    if keep > len(output.token_ids):
        raise ValueError(f"stop of request {stop.id!r} at token {stop.index}, "
                         f"but the engine returned {len(output.token_ids)} tokens")
    output.token_ids = list(output.token_ids[:keep])
    if output.log_probs is not None:
        output.log_probs = list(output.log_probs[:keep])
    return output


def _processor_settings(rollout_config: Any) -> dict[str, Any]:
    """The espo settings the rollout's vLLM engines were given (``engine_kwargs.vllm.additional_config``)."""
    kwargs = (rollout_config.get("engine_kwargs", {}) or {}).get("vllm", {}) or {}
    extra = kwargs.get("additional_config") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    return dict(extra.get(EXTRA_ARGS_KEY) or {})


class _StopCutter:
    """The agent loop's server manager, seen through one request: its answer comes back cut at its stop."""

    def __init__(self, inner: Any, reader: StopReader, request_id: str):
        self.inner, self.reader, self.request_id = inner, reader, request_id
        self.stop: StopRecord | None = None

    async def generate(self, *args: Any, **kwargs: Any) -> "TokenOutput":
        output = await self.inner.generate(*args, **kwargs)
        self.stop = self.reader.refresh().pop(self.request_id, None)  # written before the engine answered
        return cut_at_stop(output, self.stop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ESPOAgentLoop(SingleTurnAgentLoop):
    """verl's single-turn agent loop for rollouts from vLLM engines that run espo's processor.

    Each request gets a fresh 63-bit seed and an id in its ``extra_args``. When the engine answers, the
    loop reads that id's stop record from the folder the engines write to
    (``additional_config.espo.record_dir``: a folder the agent-loop workers can read, shared across nodes
    on a cluster), cuts a stopped rollout after the token that triggered the stop, and gives it the
    reward ``r_fail`` (so verl's reward step leaves it alone). Every output gets ``extra_fields``
    ``espo_stopped``, ``espo_stop_index`` (-1 when not stopped) and ``espo_seed`` (to redraw it).
    """

    _readers: dict[str, StopReader] = {}

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> "AgentLoopOutput":
        settings = _processor_settings(self.rollout_config)
        record_dir = settings.get("record_dir") or default_record_dir()
        r_fail = float((settings.get("config") or {}).get("r_fail", R_FAIL))
        seed = secrets.randbits(63)
        params = dict(sampling_params)
        params["extra_args"] = {**(params.get("extra_args") or {}), **request_args(seed, id=f"verl-{seed:016x}")}
        reader = self._readers.setdefault(record_dir, StopReader(record_dir))
        server, self.server_manager = self.server_manager, _StopCutter(self.server_manager, reader, f"verl-{seed:016x}")
        try:
            output = await super().run(params, **kwargs)
        finally:
            cutter, self.server_manager = self.server_manager, server
        stop = cutter.stop
        output.extra_fields.update({STOP_FLAG: stop is not None, STOP_INDEX: -1 if stop is None else stop.index,
                                    "espo_seed": seed})
        if stop is not None:
            output.reward_score = r_fail
        return output


core_algos.register_adv_est(ESTIMATOR)(espo_grpo_advantage)
register(AGENT_LOOP)(ESPOAgentLoop)
if os.environ.get("ESPO_VERL_GAE") == "1":
    use_espo_gae()
