"""ESPO's pieces for verl, run on their own: the estimator through verl's compute_advantage, the GAE, the config.

    python examples/verl_espo.py            (needs verl: `bash scripts/host_envs.sh verl` makes an env with it)

1. A rollout batch as verl's trainer holds it: 2 prompts x 4 rollouts, one stopped by ESPO, one cut by the
   length limit. ``mark_stops`` turns the stop flag into its reward (r_fail); verl's own
   ``compute_advantage`` then runs the registered ``espo_grpo`` estimator.
2. ``espo_gae`` beside verl's GAE at B=256, T=1024.
3. ``examples/verl_espo.yaml`` over verl's default PPO config, and the vLLM engine arguments verl takes
   from it (espo's processor among them).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rollout_batch():
    """verl's view of 8 rollouts: response masks, outcome rewards at the last token, uids and stop flags."""
    from verl import DataProto

    lengths = [5, 3, 6, 4, 2, 6, 6, 3]  # T = 6: rollout 5 hit the length limit, rollout 1 was stopped by ESPO
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]  # the task's outcome (rollout 1's is overridden)
    stopped = [False, True, False, False, False, False, False, False]
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    scores = torch.zeros(B, T)
    scores[torch.arange(B), torch.tensor(lengths) - 1] = torch.tensor(rewards)
    return DataProto.from_dict(
        tensors={"response_mask": mask, "token_level_scores": scores},
        non_tensors={"uid": np.array(["p0"] * 4 + ["p1"] * 4, dtype=object),
                     "espo_stopped": np.array(stopped, dtype=object)},
    )


def estimator_demo() -> torch.Tensor:
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from espo.integrations import verl as espo_verl  # registers espo_grpo

    data = espo_verl.mark_stops(rollout_batch())  # rollout 1's outcome becomes r_fail
    data.batch["token_level_rewards"] = data.batch["token_level_scores"]  # as verl's trainer does without a KL reward
    data = compute_advantage(data, adv_estimator=espo_verl.ESTIMATOR,
                             config=AlgoConfig(adv_estimator=espo_verl.ESTIMATOR))
    advantages = data.batch["advantages"][:, 0]
    print("espo_grpo advantages through verl's compute_advantage:", [round(a, 3) for a in advantages.tolist()])
    return advantages


def time_gae(B: int = 256, T: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of verl's GAE and espo_gae on one [B, T] batch of right-padded rollouts."""
    from verl.trainer.ppo.core_algos import compute_gae_advantage_return

    from espo.integrations.verl import espo_gae

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).float()
    values = torch.randn(B, T, generator=g) * mask
    times = {}
    for name, fn in (("verl", compute_gae_advantage_return), ("espo", espo_gae)):
        fn(rewards, values, mask, 1.0, 0.95)  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(rewards, values, mask, 1.0, 0.95)
            runs.append(time.perf_counter() - t0)
        times[name] = 1e3 * float(np.median(runs))
    return times


def gae_demo() -> dict[str, float]:
    times = time_gae()
    print(f"GAE at B=256, T=1024: verl {times['verl']:.1f} ms, espo {times['espo']:.1f} ms (median of 5)")
    return times


def config_demo() -> dict:
    """verl's default PPO config with examples/verl_espo.yaml over it: what verl's vLLM server is given.

    verl's server adds ``engine_kwargs.vllm`` to ``vllm serve``'s arguments verbatim (``--key value``, a
    list as its items, a dict as JSON: ``verl.workers.rollout.vllm_rollout.utils.build_cli_args_from_config``,
    which imports vLLM and so cannot run in verl's own environment here).
    """
    from omegaconf import OmegaConf
    from verl.trainer import config as verl_config
    from verl.utils.config import omega_conf_to_dataclass

    base = OmegaConf.load(os.path.join(os.path.dirname(verl_config.__file__), "_generated_ppo_trainer.yaml"))
    ours = OmegaConf.load(os.path.join(HERE, "verl_espo.yaml"))
    ours.pop("defaults")
    config = OmegaConf.merge(base, ours)
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)  # verl's RolloutConfig, as its server reads it
    engine_kwargs = dict(rollout.get("engine_kwargs", {}).get("vllm", {}))
    print("algorithm.adv_estimator:", config.algorithm.adv_estimator, "| agent loop:", rollout.agent.default_agent_loop)
    print("vLLM engine arguments from engine_kwargs.vllm:", engine_kwargs)
    return {"config": config, "engine_kwargs": engine_kwargs}


if __name__ == "__main__":
    estimator_demo()
    gae_demo()
    config_demo()
