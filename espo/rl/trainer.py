"""A lean PPO/GRPO trainer with ESPO early stopping and CERO rollout allocation, in one loop.

``setup`` builds a run (or restores it from its checkpoint) and ``train_step`` advances it by one step,
which reads as the algorithm:

    1. prompts     this step's prompts and the rollouts each gets (CERO decides, or group_size)
    2. rollouts    espo.Decoder samples them; the stopper ends rows inside the sampling kernel
    3. rewards     the task's outcome, or r_fail for a stopped rollout (an absorbing failure)
    4. advantages  GAE on the value head, or group-normalised rewards
    5. update      PPO epochs over minibatches, each in length-sorted micro-batches
    6. record      metrics, and an atomic checkpoint

A stopped rollout ends at the token that triggered the stop; that token gets ``espo.r_fail`` and the
state after it is terminal (GAE does not bootstrap past it). Every other rollout gets the task's reward
on its last token. The stopper is armed by ESPO's critic warm-up rule (``CriticWarmup``) in the critic
modes and from the start in the critic-free ones; ``end_batch`` runs after every rollout batch. What
training does not need is measured by one optional hook, ``Diagnostics``, timed apart from the step: false
stops, the tokens a perfect stopper would have cut, held-out accuracy (``NoDiagnostics`` measures nothing).

Runs under ``torchrun --nproc_per_node N`` too: each rank decodes its share of the step's prompts,
gradients are averaged across ranks, and the stopper's batch statistics and the allocator's updates are
summed across ranks, so their state stays identical everywhere. Only rank 0 writes files.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from espo.engine.decoder import Decoder, Rollouts
from espo.engine.models import builtin_model_path, load_model
from espo.engine.value_head import ValueHead
from espo.ops.stopper import CriticWarmup, EarlyStopper
from espo.tasks import builtin_task, check_task, score, task_from_checkpoint, task_problems, tokens_after_mistake
from espo.tasks.prompting import encode_prompt, stop_token_ids

from .advantages import gae, group_advantages
from .allocator import CeroAllocator
from .checkpoint import disk_write_error, save_atomic
from .config import ALGOS, PRESETS, Algo, TrainConfig
from .run_folder import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    RunFolderLock,
    check_apart_from_model,
    check_new_run_folder,
    lock_run_folder,
    rerun_hint,
    resume_config,
    resume_state,
    start_run_folder,
)
from .update import Batch, Targets, build_batch, minibatch_backward, score_batch
from .value_fit import HEAD_FILE, load_value_head

__all__ = [
    "ALGOS",
    "PRESETS",
    "Diagnostics",
    "NoDiagnostics",
    "Run",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "resume_config",
    "setup",
    "train",
    "train_step",
]
LOSS_TERMS = {"policy_loss": "the policy loss", "value_loss": "the value loss", "kl": "the KL penalty"}
STAT_KEYS = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "kl")


class TrainingDiverged(RuntimeError):
    """A loss, gradient or parameter stopped being finite; nothing of that step was written."""


# ---------------------------------------------------------------------------------------------- ranks


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + salt) % (2**62)


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything a training run holds; ``setup`` builds it and ``train_step`` advances it."""

    cfg: TrainConfig
    algo: Algo
    rank: int
    world: int
    out_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    task: Any
    value_head: ValueHead | None  # critic algorithms: V(s) on the policy's last hidden state
    reference: torch.nn.Module | None  # the initial policy, for the KL penalty (kl_coef > 0)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    decoder: Decoder
    stopper: EarlyStopper | None
    warmup: CriticWarmup
    allocator: CeroAllocator | None
    problems: list  # the training prompt set; prompts[i] is problems[i]'s token ids
    prompts: list[list[int]]
    order: np.ndarray  # the shuffled walk over the prompt set
    max_new: int
    eos: list[int]  # the ids that end a completion (espo.tasks.prompting.stop_token_ids); [] for none
    diagnostics: "NoDiagnostics"  # the optional hook: Diagnostics, or NoDiagnostics to measure nothing
    history: list[dict]
    start: int  # the first step to run (after a resume, the one after the checkpoint's)
    lock: RunFolderLock | None = None  # rank 0 holds its folder's lock for the run's life (``close`` drops it)

    def close(self) -> None:
        """Drop the run folder's lock: another run may use the folder from then on."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    def finite(self, value: torch.Tensor | float, what: str, step: int) -> float:
        """``float(value)``, or TrainingDiverged naming ``what`` when it is NaN or infinite."""
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            kept = "no checkpoint had been written yet (a rerun starts the run again)"
            if self.ckpt_path.is_file():
                kept = (f"the last good checkpoint (after step {step - 1}) is kept at {self.ckpt_path}; resume from it "
                        "with --resume and a lower --lr")
            raise TrainingDiverged(
                f"training diverged at step {step}: {what} is not finite. The usual cause is a learning rate too high "
                f"for this model (lr={self.cfg.lr}, max_grad_norm={self.cfg.max_grad_norm}); lower --lr. Nothing of "
                f"this step was written: {kept}"
            )
        return v


def _task_for(cfg: TrainConfig, task: Any) -> Any:
    if task is None:
        task = builtin_task() if cfg.model is None else task_from_checkpoint(cfg.model)
        if task is None:
            raise ValueError(f"{cfg.model} has no card.json naming its task (as scripts/make_tiny_model.py writes, or "
                             'add "task": {"kind": "word-problems", "digits": 1, "steps": 1, "ops": "+"} to its '
                             "card.json): a run on your own checkpoint needs a named task, or your own, "
                             "train(cfg, task=...)")
    return check_task(task)


def setup(cfg: TrainConfig, *, task: Any = None, resume: bool = False, overwrite: bool = False,
          diagnostics: bool = True) -> Run:
    """Build the run ``cfg`` describes: model, task and prompts, learner state, decoder, stopper, allocator.

    ``resume`` restores it from the checkpoint in ``cfg.out_dir`` (checked before any weights are loaded);
    otherwise a folder that holds a run is refused unless ``overwrite``. The folder is locked for the run's life
    (``Run.close`` drops the lock; ``train`` does so at its end) and written only once everything is built.
    ``diagnostics=False`` measures nothing beside training (no false-stop checks, doomed tokens or held-out
    accuracy).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(cfg).__name__}")
    rank, world = _distributed(cfg.device)
    out_dir, lock = Path(cfg.out_dir), None
    if rank == 0:
        check_apart_from_model(out_dir, Path(cfg.model) if cfg.model is not None else builtin_model_path())
        lock = lock_run_folder(out_dir, create=not resume)
    try:
        run = _build(cfg, rank, world, task=task, resume=resume, overwrite=overwrite, diagnostics=diagnostics)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _build(cfg: TrainConfig, rank: int, world: int, *, task: Any, resume: bool, overwrite: bool,
           diagnostics: bool) -> Run:
    """``setup`` once the run folder is locked: everything is built and checked before the folder is written."""
    algo, device, dtype = ALGOS[cfg.algo], torch.device(cfg.device), getattr(torch, cfg.dtype)
    out_dir = Path(cfg.out_dir)
    state = resume_state(cfg, out_dir / CHECKPOINT_FILE) if resume else None
    if rank == 0 and state is None:
        check_new_run_folder(out_dir, overwrite)
    torch.manual_seed(cfg.seed)

    # policy, task, prompts
    model, tokenizer = load_model(cfg.model or builtin_model_path(), device=device, dtype=dtype)
    task = _task_for(cfg, task)
    if cfg.num_problems < cfg.prompts_per_step:
        raise ValueError(f"num_problems ({cfg.num_problems}) must be >= prompts_per_step ({cfg.prompts_per_step})")
    problems = task_problems(task, cfg.num_problems, seed=cfg.seed)
    eval_set = task_problems(task, cfg.eval_problems, seed=cfg.seed + 1_000_003) if cfg.eval_problems else []
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    eval_prompts = [encode_prompt(tokenizer, p.prompt) for p in eval_set]
    max_new = cfg.max_new_tokens or int(getattr(task, "max_new_tokens", 128))
    max_len = max(len(p) for p in prompts + eval_prompts) + max_new

    # learner state: value head, optimizer, reference policy
    value_head = initial_value_head(cfg, model.config.hidden_size, device) if algo.critic else None
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    groups = [{"params": params}]
    if value_head is not None and cfg.value_lr > 0:  # its own group only then: older checkpoints have one
        groups = [{"params": list(model.parameters())}, {"params": list(value_head.parameters()), "lr": cfg.value_lr}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.kl_coef > 0 else None

    # rollouts: the decoder, the stopper and its arming rule, the allocator
    decoder = Decoder(model, max_batch=cfg.max_batch, max_seq_len=max_len, device=device, dtype=dtype,
                      value_source=value_head if algo.stops else None)
    stopper = EarlyStopper(cfg.espo, cfg.max_batch, device) if algo.stops else None
    if stopper is not None and not algo.critic:
        stopper.arm()  # the posterior mean needs no warm-up
    budget = cfg.cero_budget or cfg.steps * cfg.prompts_per_step * cfg.group_size
    if algo.allocates and budget < 2:
        raise ValueError(f"cero_budget ({budget}) is smaller than one group (2 rollouts): raise it or use algo=grpo")
    # CERO's Beta posteriors also give the critic-free ESPO modes their per-prompt value (grpo-espo: posteriors only)
    allocator = CeroAllocator(cfg.num_problems, budget, cfg.steps * cfg.prompts_per_step / cfg.num_problems,
                              n_min=2, n_max=2 * cfg.group_size) if algo.allocates or _posterior_values(algo) else None

    run = Run(cfg=cfg, algo=algo, rank=rank, world=world, out_dir=out_dir, model=model, tokenizer=tokenizer, task=task,
              value_head=value_head, reference=reference, params=params, optimizer=optimizer, decoder=decoder,
              stopper=stopper, warmup=CriticWarmup(total_steps=cfg.steps), allocator=allocator, problems=problems,
              prompts=prompts, order=np.random.default_rng(cfg.seed).permutation(cfg.num_problems), max_new=max_new,
              eos=stop_token_ids(tokenizer, model), history=[], start=0,
              diagnostics=Diagnostics(eval_set, eval_prompts) if diagnostics else NoDiagnostics())
    if state is not None:
        _restore(run, state)
    if rank == 0:
        start_run_folder(out_dir, cfg.to_dict(), run.history, new=state is None)
    run.diagnostics.initial = run.history[0]["initial_eval_accuracy"] if run.history else run.diagnostics.accuracy(run)
    return run


def value_head_source(cfg: TrainConfig) -> Path | None:
    """The fitted head ``cfg.value_head`` names (auto: the model folder's, when it has one), or None."""
    if cfg.value_head == "none":
        return None
    if cfg.value_head == "auto":
        folder = Path(cfg.model) if cfg.model is not None else None
        return folder if folder is not None and (folder / HEAD_FILE).is_file() else None
    return Path(cfg.value_head)


def initial_value_head(cfg: TrainConfig, hidden_size: int, device: torch.device) -> ValueHead:
    """The critic's head before training: the fitted one ``cfg.value_head`` names, else a new one at 0.5."""
    source = value_head_source(cfg)
    if source is None:
        head = ValueHead(hidden_size, device=device)
        torch.nn.init.zeros_(head.proj.weight)
        torch.nn.init.constant_(head.proj.bias, 0.5)
        return head
    head, card = load_value_head(source, hidden_size)
    fitted_at = (card.get("temperature"), card.get("top_p"))
    if None not in fitted_at and fitted_at != (cfg.temperature, cfg.top_p):
        warnings.warn(f"the value head at {source} was fitted on rollouts sampled at temperature {fitted_at[0]}, "
                      f"top_p {fitted_at[1]}, but this run samples at {cfg.temperature}, {cfg.top_p}: its values "
                      "may be off; refit it with espo value fit at this run's sampling", stacklevel=2)
    return head.to(device)


def _restore(run: Run, state: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    if run.value_head is not None:
        run.value_head.load_state_dict(state["value_head"])
    run.optimizer.load_state_dict(state["optimizer"])
    for i, group in enumerate(run.optimizer.param_groups):  # a resumed run may lower lr
        group["lr"] = run.cfg.value_lr if i == 1 else run.cfg.lr
    if run.stopper is not None:
        run.stopper.load_state_dict(state["stopper"])
    if run.allocator is not None:
        run.allocator.load_state_dict(state["allocator"])
    run.warmup = CriticWarmup(**state["warmup"])
    run.history, run.start = state["history"], state["step"] + 1


# ------------------------------------------------------------------------------------ the step's parts


class StepPrompts(NamedTuple):
    """A step's prompts: ids [P] into the prompt set, the rollouts each gets [P], and this rank's share
    (positions in ids; prompts with no rollouts left out)."""

    ids: np.ndarray
    counts: np.ndarray
    local: list[int]

    def local_ids(self) -> list[int]:
        """The prompt-set ids of this rank's prompts, in the decoder's prompt order."""
        return [int(self.ids[j]) for j in self.local]

    def id_of(self, rollout) -> int:
        """The prompt-set id of one of this rank's rollouts."""
        return int(self.ids[self.local[rollout.prompt_index]])


class Rewards(NamedTuple):
    """One reward per rollout (r_fail when stopped), the successes per prompt [P], the wrong rollouts."""

    rewards: list[float]
    successes: np.ndarray
    wrong: list


def choose_prompts(run: Run, step: int) -> StepPrompts:
    """1. The step's prompts (a deterministic walk over the shuffled set) and their rollout counts."""
    cfg = run.cfg
    first = step * cfg.prompts_per_step
    ids = run.order[np.arange(first, first + cfg.prompts_per_step) % cfg.num_problems]
    counts = run.allocator.allocate(ids).numpy() if run.algo.allocates else np.full(len(ids), cfg.group_size)
    local = [j for j in range(len(ids)) if j % run.world == run.rank and counts[j] > 0]
    return StepPrompts(ids, counts, local)


def _posterior_values(algo) -> bool:
    """Critic-free ESPO: each prompt's posterior mean success rate is the value in the stop threshold."""
    return algo.stops and not algo.critic


def generate_rollouts(run: Run, step: int, prompts: StepPrompts) -> Rollouts | None:
    """2. This rank's rollouts; the stopper (if any) ends rows inside the sampling kernel."""
    if not prompts.local:
        return None
    prompt_ids = prompts.local_ids()
    prompt_values = None
    if _posterior_values(run.algo):  # the posterior mean success rate stands in for V
        prompt_values = run.allocator.posterior_mean(np.array(prompt_ids)).tolist()
    rollouts = run.decoder.generate(
        [run.prompts[i] for i in prompt_ids], [int(prompts.counts[j]) for j in prompts.local],
        max_new_tokens=run.max_new, temperature=run.cfg.temperature, top_p=run.cfg.top_p,
        seed=_step_seed(run.cfg.seed, step, run.rank), stopper=run.stopper, eos_token_id=run.eos,
        prompt_values=prompt_values, progress=False,
    )
    if all(r.finish_reason == "invalid" for r in rollouts):
        raise TrainingDiverged(f"every rollout of step {step} was invalid: the model's logits are NaN or infinite "
                               f"(a diverged or broken checkpoint; lr={run.cfg.lr}). Nothing of this step was written.")
    return rollouts


def reward_rollouts(run: Run, prompts: StepPrompts, rollouts: Rollouts | None) -> Rewards:
    """3. The task's outcome of every rollout, r_fail for a stopped one (an absorbing failure)."""
    cfg = run.cfg
    rewards, successes, wrong = [], np.zeros(len(prompts.ids)), []
    for r in rollouts or []:
        j = prompts.local[r.prompt_index]
        if r.finish_reason == "stopped":
            reward = cfg.espo.r_fail
        else:
            text = run.tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True)
            reward = score(run.task, run.problems[prompts.ids[j]], text)
            successes[j] += reward >= cfg.success_threshold
            if reward < cfg.success_threshold:
                wrong.append(r)
        rewards.append(reward)
    return Rewards(rewards, successes, wrong)


def close_batch(run: Run, prompts: StepPrompts, rewards: Rewards) -> tuple[dict, np.ndarray]:
    """The batch boundary: the stopper's statistics and threshold, the allocator's posteriors (summed over
    ranks). Returns the stopper's report and the successes per prompt summed over ranks."""
    stop_report = run.stopper.end_batch(all_reduce=_all_reduce) if run.stopper is not None else {}
    successes = _all_reduce(torch.tensor(rewards.successes, dtype=torch.float64)).numpy()
    if run.allocator is not None:
        run.allocator.update(prompts.ids, successes.astype(np.int64), prompts.counts)
    return stop_report, successes


def advantages(run: Run, batch: Batch) -> Targets:
    """4. What the update fits: the old policy's logprobs and values [N, T], the advantages [N, T], the returns
    (critic) and the reference logprobs (KL penalty)."""
    cfg = run.cfg
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.update_tokens)
    old_logprobs, old_values = score_batch(run.model, run.value_head, batch, **sampling)
    ref_logprobs = None
    if run.reference is not None:
        ref_logprobs = score_batch(run.reference, None, batch, **sampling)[0]
    N, T = batch.mask.shape
    if run.algo.critic:
        last = batch.mask.sum(1) - 1  # the index of each rollout's final token
        token_rewards = torch.zeros(N, T, device=run.device).scatter(1, last[:, None], batch.rewards[:, None])
        adv, returns = gae(token_rewards, old_values, batch.mask, gamma=cfg.gamma, lam=cfg.lam)
        live = adv[batch.mask]
        adv = (adv - live.mean()) / (live.std() + 1e-6) * batch.mask if live.numel() > 1 else adv
    else:
        adv = group_advantages(batch.rewards, batch.group)[:, None].expand(N, T) * batch.mask
        returns = None
    return Targets(batch, old_logprobs, old_values, adv, returns, ref_logprobs)


def value_fit(targets: Targets) -> dict[str, float]:
    """How well the value head (before this step's update) predicted the returns: explained variance
    1 - Var(returns - values) / Var(returns) over the batch's tokens (1 perfect, 0 no better than their mean), and
    the mean value at a rollout's first token (what scales the stop threshold at the start). Empty without a critic."""
    if targets.returns is None or targets.old_values is None:
        return {}
    m = targets.batch.mask
    returns, values = targets.returns[m].double(), targets.old_values[m].double()
    var = returns.var(unbiased=False)
    explained = float(1 - (returns - values).var(unbiased=False) / var) if var > 0 else float("nan")
    return {"explained_variance": explained, "value_at_start": float(targets.old_values[:, 0].double().mean())}


def update(run: Run, step: int, targets: Targets) -> dict[str, float]:
    """5. PPO epochs over random minibatches; gradients averaged across ranks. Returns the mean loss terms
    (means over ranks too)."""
    cfg = run.cfg
    perm_gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, run.rank, salt=1))
    sums, updates = dict.fromkeys(STAT_KEYS, 0.0), 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(targets.batch.rewards), generator=perm_gen).to(run.device)
        for rows in order.chunk(cfg.minibatches):
            run.optimizer.zero_grad(set_to_none=True)
            terms = minibatch_backward(run.model, run.value_head, targets, rows, cfg)
            for name, what in LOSS_TERMS.items():
                sums[name] += run.finite(terms[name], what, step)
            if run.world > 1:
                for p in run.params:
                    if p.grad is not None:
                        _all_reduce(p.grad).div_(run.world)
            run.finite(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm), "the gradient norm", step)
            run.optimizer.step()
            sums["clip_fraction"] += terms["clip_fraction"]
            sums["approx_kl"] += terms["approx_kl"]
            updates += 1
    stats = {k: v / max(updates, 1) for k, v in sums.items()}
    if run.world > 1:
        means = _all_reduce(torch.tensor([stats[k] for k in STAT_KEYS], dtype=torch.float64)) / run.world
        stats = dict(zip(STAT_KEYS, means.tolist()))
    return stats


def _informative_rollouts(batch: Batch | None) -> float:
    """Rollouts in groups whose rewards are not all equal (the groups with a non-zero GRPO advantage)."""
    if batch is None:
        return 0.0
    _, inverse = torch.unique(batch.group, return_inverse=True)
    lo = torch.full((int(inverse.max()) + 1,), math.inf, device=batch.rewards.device)
    lo = lo.scatter_reduce(0, inverse, batch.rewards, "amin")
    hi = torch.full_like(lo, -math.inf).scatter_reduce(0, inverse, batch.rewards, "amax")
    return float((hi > lo)[inverse].sum())


def rollout_counts(run: Run, rollouts: Rollouts | None, batch: Batch | None, measured: dict, successes) -> dict:
    """6. The step's counts, summed over ranks: rollouts, tokens, successes, stops and what the diagnostics
    measured of them."""
    stopped = sum(r.finish_reason == "stopped" for r in rollouts or [])
    totals = _all_reduce(torch.tensor([
        len(rollouts or []), rollouts.tokens_generated if rollouts else 0, stopped, measured["false_stops"],
        measured["checked"], _informative_rollouts(batch), measured["doomed"] or 0,
    ], dtype=torch.float64)).tolist()
    n_roll, n_tok, n_stop, n_false, n_checked, n_inform, n_doomed = totals
    return {
        "rollouts": int(n_roll), "tokens": int(n_tok),
        "cum_tokens": (run.history[-1]["cum_tokens"] if run.history else 0) + int(n_tok),
        "success_rate": float(successes.sum() / max(n_roll, 1)), "stop_rate": n_stop / max(n_roll, 1),
        "stopped": int(n_stop), "false_stops": int(n_false), "false_stop_checked": int(n_checked),
        "informative_fraction": n_inform / max(n_roll, 1),
        "doomed_tokens": None if measured["doomed"] is None else int(n_doomed),
    }


def save_step(run: Run, step: int, record: dict) -> None:
    """An atomic checkpoint, then the step's metrics line, once every parameter is known to be finite: a checkpoint
    that cannot be written (a full disk) leaves no line for its step, and the previous checkpoint is kept."""
    run.finite(torch.nn.utils.get_total_norm(run.params, norm_type=math.inf), "a parameter", step)
    run.history.append(record)
    if run.rank != 0:
        return
    save_atomic({
        "config": run.cfg.to_dict(), "step": step, "history": run.history, "model": run.model.state_dict(),
        "value_head": run.value_head.state_dict() if run.value_head is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "stopper": run.stopper.state_dict() if run.stopper is not None else None,
        "allocator": run.allocator.state_dict() if run.allocator is not None else None,
        "warmup": dataclasses.asdict(run.warmup),
    }, run.ckpt_path, then=rerun_hint(run.out_dir))
    try:
        with open(run.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # the checkpoint holds the step: a resumed run rewrites metrics.jsonl from it
        raise disk_write_error("metrics", run.out_dir / METRICS_FILE, err) from err


# ------------------------------------------------------------------------------------------- the loop


def train_step(run: Run, step: int) -> dict:
    """One training step; returns its metrics record (also appended to ``run.history`` and the run folder)."""
    t0 = time.perf_counter()
    prompts = choose_prompts(run, step)  # 1
    rollouts = generate_rollouts(run, step, prompts)  # 2
    t_rollout, t = time.perf_counter() - t0, time.perf_counter()
    rewards = reward_rollouts(run, prompts, rollouts)  # 3
    stop_report, successes = close_batch(run, prompts, rewards)
    t_reward = time.perf_counter() - t
    measured = run.diagnostics.after_rollouts(run, step, prompts, rollouts, rewards.wrong)  # timed apart
    t = time.perf_counter()
    batch = build_batch([run.prompts[i] for i in prompts.local_ids()], rollouts, rewards.rewards, prompts.local_ids(),
                        pad_id=run.eos[0] if run.eos else 0, device=run.device) if rollouts else None
    targets = advantages(run, batch) if batch is not None else None  # 4
    stats = {**update(run, step, targets), **value_fit(targets)} if targets is not None else {}  # 5
    if run.algo.critic and run.stopper is not None and run.warmup.update(stats.get("value_loss", 0.0), step):
        run.stopper.arm()
    t_update = time.perf_counter() - t
    eval_accuracy, t_eval = run.diagnostics.scheduled_accuracy(run, step)  # timed apart

    record = {  # 6
        "step": step, "algo": run.cfg.algo, **rollout_counts(run, rollouts, batch, measured, successes),
        "eval_accuracy": eval_accuracy, "armed": bool(run.stopper.armed) if run.stopper is not None else False,
        "beta": stop_report.get("beta"),
        "stoppable_below_value": run.cfg.espo.stoppable_below(stop_report["beta"]) if "beta" in stop_report else None,
        # the step's own cost (what training needs) apart from what measuring it costs
        "rollout_time_s": t_rollout, "reward_time_s": t_reward, "update_time_s": t_update,
        "step_time_s": t_rollout + t_reward + t_update, "measure_time_s": measured["time_s"], "eval_time_s": t_eval,
        "time_s": time.perf_counter() - t0, **stats,
    }
    if step == 0:
        record["initial_eval_accuracy"] = run.diagnostics.initial
    save_step(run, step, record)
    return record


@dataclass
class TrainResult:
    """What a run leaves: its metrics (one dict per step, as in ``metrics.jsonl``) and its trained state."""

    history: list[dict]
    model: torch.nn.Module
    value_head: ValueHead | None
    stopper: EarlyStopper | None
    allocator: CeroAllocator | None


def train(
    cfg: TrainConfig,
    *,
    task: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    diagnostics: bool = True,
) -> TrainResult:
    """Run ``cfg``; metrics go to ``out_dir/metrics.jsonl`` and an atomic checkpoint after every step.

    ``resume`` continues the run whose checkpoint is in ``out_dir`` (its configuration must match ``cfg`` but
    for ``RESUMABLE_CHANGES``; a larger ``steps`` extends a finished run). Without it a folder that holds a
    run is refused unless ``overwrite`` is given. A loss, gradient or parameter that stops being finite
    raises ``TrainingDiverged`` before anything is written, so the last good checkpoint survives.
    ``diagnostics=False`` skips what only measures the run (false-stop checks, doomed tokens, evaluation).
    """
    run = setup(cfg, task=task, resume=resume, overwrite=overwrite, diagnostics=diagnostics)
    bar = None
    try:
        if progress and run.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=run.start, desc=cfg.algo, unit="step")
        for step in range(run.start, cfg.steps):
            record = train_step(run, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{record['success_rate']:.2f}", stop=f"{record['stop_rate']:.2f}",
                                tokens=record["cum_tokens"])
            if on_step is not None:
                on_step(record)
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return TrainResult(run.history, run.model, run.value_head, run.stopper, run.allocator)


# ---------------------------------------------------------------------------------------- diagnostics


class NoDiagnostics:
    """The diagnostics hook that measures nothing (``setup(cfg, diagnostics=False)``): a run then spends no time
    beside its steps, and its records say None (or 0 checked) where a measurement would be."""

    initial: float | None = None

    def after_rollouts(self, run: Run, step: int, prompts: StepPrompts, rollouts: Rollouts | None, wrong: list) -> dict:
        """What was measured of a step's rollouts: false stops (of ``checked`` stops), doomed tokens, seconds."""
        return {"false_stops": 0, "checked": 0, "doomed": None, "time_s": 0.0}

    def scheduled_accuracy(self, run: Run, step: int) -> tuple[float | None, float]:
        """(the held-out accuracy if this step is scheduled to evaluate, else None; the seconds it took)."""
        return None, 0.0

    def accuracy(self, run: Run) -> float | None:
        return None


class Diagnostics(NoDiagnostics):
    """What the trainer measures beside training, timed apart from the step's own cost.

    * false stops: a share (``false_stop_sample``) of each step's stopped rollouts is continued from scratch
      with its own seed and no stopper (the same tokens up to the stop, then on); a stop was false when that
      finished rollout is correct;
    * doomed tokens: with a task that says where a wrong completion first went wrong (``first_mistake``), the
      tokens of wrong rollouts after that point: in a run without stopping, what a perfect stopper would cut;
    * held-out accuracy: sampled at the training temperature, without stopping, every ``eval_every`` steps.
    """

    def __init__(self, eval_set: list, eval_prompts: list[list[int]]):
        self.eval_set, self.eval_prompts = eval_set, eval_prompts

    def after_rollouts(self, run: Run, step: int, prompts: StepPrompts, rollouts: Rollouts | None, wrong: list) -> dict:
        t = time.perf_counter()
        stopped = [r for r in rollouts or [] if r.finish_reason == "stopped"]
        checked = self._false_stop_sample(run, step, stopped) if run.cfg.check_false_stops else []
        false = self._count_false_stops(run, prompts, checked) if checked else 0
        doomed = None
        if callable(getattr(run.task, "first_mistake", None)):
            doomed = sum(tokens_after_mistake(run.task, run.tokenizer, run.problems[prompts.id_of(r)],
                                              r.tokens.tolist()) for r in wrong)
        return {"false_stops": false, "checked": len(checked), "doomed": doomed, "time_s": time.perf_counter() - t}

    @staticmethod
    def _false_stop_sample(run: Run, step: int, stopped: list) -> list:
        """The stopped rollouts whose stop is checked: all of them, or a random ``false_stop_sample`` share."""
        if run.cfg.false_stop_sample >= 1.0 or not stopped:
            return stopped
        rng = np.random.default_rng(_step_seed(run.cfg.seed, step, run.rank, salt=2))
        keep = rng.random(len(stopped)) < run.cfg.false_stop_sample
        return [r for r, k in zip(stopped, keep) if k]

    @staticmethod
    @torch.no_grad()
    def _count_false_stops(run: Run, prompts: StepPrompts, checked: list) -> int:
        cfg = run.cfg
        ids = [prompts.id_of(r) for r in checked]
        redo = run.decoder.generate(
            [run.prompts[i] for i in ids], 1, max_new_tokens=run.max_new,
            temperature=cfg.temperature, top_p=cfg.top_p, rollout_seeds=[r.seed for r in checked], eos_token_id=run.eos,
            progress=False,
        )
        false = 0
        for i, full in zip(ids, redo):
            text = run.tokenizer.decode(full.tokens.tolist(), skip_special_tokens=True)
            false += score(run.task, run.problems[i], text) >= cfg.success_threshold
        return false

    def scheduled_accuracy(self, run: Run, step: int) -> tuple[float | None, float]:
        t = time.perf_counter()
        due = (step + 1) % run.cfg.eval_every == 0 or step + 1 == run.cfg.steps
        accuracy = self.accuracy(run) if due else None
        return accuracy, time.perf_counter() - t

    @torch.no_grad()
    def accuracy(self, run: Run) -> float | None:
        """Sampled (cfg.temperature, cfg.top_p) accuracy on the held-out problems, the same seeds every time."""
        if not self.eval_set:
            return None
        cfg = run.cfg
        share = list(range(run.rank, len(self.eval_set), run.world))
        correct = 0.0
        if share:
            out = run.decoder.generate([self.eval_prompts[i] for i in share], 1, max_new_tokens=run.max_new,
                                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + 77,
                                       eos_token_id=run.eos, progress=False)
            for i, r in zip(share, out):
                text = run.tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True)
                correct += score(run.task, self.eval_set[i], text) >= cfg.success_threshold
        return float(_all_reduce(torch.tensor([correct], dtype=torch.float64))[0]) / len(self.eval_set)
