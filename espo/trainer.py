"""A lean PPO/GRPO trainer with ESPO early stopping and CERO rollout allocation, in one loop.

    algo        advantages                      values for the stop rule     rollouts per prompt
    ppo         GAE on a value head              -                            group_size
    espo        GAE on a value head              the value head               group_size
    grpo        group-normalised rewards         -                            group_size
    grpo-cero   group-normalised rewards         -                            CeroAllocator
    espo-cero   group-normalised rewards         allocator posterior mean     CeroAllocator

A stopped rollout ends at the token that triggered the stop; that token gets ``espo.r_fail`` and the
state after it is terminal (GAE does not bootstrap past it). Every other rollout gets the task's reward
on its last token. The stopper is armed by ESPO's critic warm-up rule (``CriticWarmup``) in the critic
modes and from the start in the critic-free ones; ``end_batch`` runs after every rollout batch.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .advantages import gae, group_advantages
from .allocator import CeroAllocator
from .checks import check_bool, check_choice, check_device, check_float, check_int
from .checkpoint import load_checkpoint, save_atomic, write_text_atomic
from .decoder import Decoder, Rollouts
from .losses import kl_penalty, policy_loss, value_loss
from .stopper import CriticWarmup, EarlyStopper, ESPOConfig
from .tasks import (CharTokenizer, builtin_model_path, builtin_task, check_task, load_model, score, task_problems,
                    task_from_checkpoint, tokens_after_mistake)
from .value_head import ValueHead

DTYPES = ("float32", "bfloat16", "float16", "float64")
ALGOS = {  # name: (critic, stopper, allocator)
    "ppo": (True, False, False),
    "espo": (True, True, False),
    "grpo": (False, False, False),
    "grpo-cero": (False, False, True),
    "espo-cero": (False, True, True),
}


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run. ``model=None`` is the built-in tiny model and its task."""

    algo: str = "espo"
    model: str | None = None  # a local transformers checkpoint folder
    steps: int = 30
    prompts_per_step: int = 16
    group_size: int = 8  # rollouts per prompt (CERO: the average; it gives 0 or 2..2*group_size)
    cero_budget: int = 0  # CERO's rollouts for the whole run; 0: steps * prompts_per_step * group_size
    num_problems: int = 256  # the training prompt set
    max_new_tokens: int = 0  # 0: the task's own limit (or 128)
    temperature: float = 1.0
    lr: float = 2e-4
    ppo_epochs: int = 2
    minibatches: int = 2
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    success_threshold: float = 1.0  # a reward >= this counts as a success (accuracy, CERO's posteriors)
    espo: ESPOConfig = field(default_factory=ESPOConfig)
    eval_problems: int = 64
    eval_every: int = 5
    check_false_stops: bool = True  # continue stopped rollouts without the stopper and verify them (timed apart)
    false_stop_sample: float = 1.0  # the share of stopped rollouts so checked (1: every one, exact)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 128  # decoder slots per rank
    update_tokens: int = 8192  # largest padded micro-batch (rows x longest row) of an update forward
    out_dir: str = "runs/train"

    def __post_init__(self) -> None:
        if isinstance(self.espo, dict):
            self.espo = ESPOConfig(**self.espo)
        if not isinstance(self.espo, ESPOConfig):
            raise TypeError(f"TrainConfig.espo must be an ESPOConfig or a dict of its fields, got {type(self.espo).__name__}")
        check_choice("TrainConfig.algo", self.algo, tuple(ALGOS))
        if self.model is not None and not (isinstance(self.model, (str, os.PathLike)) and str(self.model)):
            raise TypeError(f"TrainConfig.model must be a checkpoint folder or None (the built-in model), got {self.model!r}")
        for name in ("steps", "prompts_per_step", "group_size", "num_problems", "ppo_epochs", "minibatches", "max_batch",
                     "eval_every", "update_tokens"):
            setattr(self, name, check_int(f"TrainConfig.{name}", getattr(self, name), minimum=1))
        for name in ("cero_budget", "max_new_tokens", "eval_problems", "seed"):
            setattr(self, name, check_int(f"TrainConfig.{name}", getattr(self, name), minimum=0))
        for name in ("temperature", "lr", "clip", "max_grad_norm"):
            setattr(self, name, check_float(f"TrainConfig.{name}", getattr(self, name), above=0.0))
        for name in ("value_clip", "vf_coef", "kl_coef"):
            setattr(self, name, check_float(f"TrainConfig.{name}", getattr(self, name), minimum=0.0))
        for name in ("gamma", "lam"):
            setattr(self, name, check_float(f"TrainConfig.{name}", getattr(self, name), minimum=0.0, maximum=1.0))
        self.false_stop_sample = check_float("TrainConfig.false_stop_sample", self.false_stop_sample, above=0.0,
                                             maximum=1.0)
        self.success_threshold = check_float("TrainConfig.success_threshold", self.success_threshold)
        self.check_false_stops = check_bool("TrainConfig.check_false_stops", self.check_false_stops)
        check_choice("TrainConfig.dtype", self.dtype, DTYPES)
        self.device = check_device("TrainConfig.device", self.device)
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise TypeError(f"TrainConfig.out_dir must be a folder path, got {self.out_dir!r}")
        self.out_dir = str(self.out_dir)
        if self.group_size < 2 and self.algo.startswith(("grpo", "espo-cero")):
            raise ValueError(f"{self.algo} needs group_size >= 2 (a group advantage needs two rollouts)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- setup


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


def _encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text, add_bos=True)
    return list(tokenizer.encode(text))


def _step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + salt) % (2**62)


# ------------------------------------------------------------------------------------- batch tensors


@dataclass
class Batch:
    """One step's rollouts as right-padded tensors (N rollouts, S sequence positions, T generated tokens)."""

    input_ids: torch.Tensor  # [N, S] prompt + generated tokens
    attention_mask: torch.Tensor  # [N, S]
    positions: torch.Tensor  # [N, T] index in input_ids of the input predicting generated token t
    tokens: torch.Tensor  # [N, T] generated tokens
    mask: torch.Tensor  # [N, T] 1 on real generated tokens
    rewards: torch.Tensor  # [N] terminal reward (task outcome, or r_fail when stopped)
    group: torch.Tensor  # [N] prompt id of each rollout
    seq_lens: torch.Tensor  # [N] prompt + generated tokens of each rollout (its real columns of input_ids)
    lengths: torch.Tensor  # [N] generated tokens of each rollout (its real columns of tokens)


def build_batch(prompts: list[list[int]], rollouts: Rollouts, rewards: list[float], prompt_ids: list[int], pad_id: int, device) -> Batch:
    kept = [i for i, r in enumerate(rollouts) if r.length > 0]
    seqs = [prompts[rollouts[i].prompt_index] + rollouts[i].tokens.tolist() for i in kept]
    N, S = len(kept), max(len(s) for s in seqs)
    T = max(rollouts[i].length for i in kept)
    input_ids = torch.full((N, S), pad_id, dtype=torch.int64)
    attention = torch.zeros(N, S, dtype=torch.int64)
    positions = torch.zeros(N, T, dtype=torch.int64)
    tokens = torch.zeros(N, T, dtype=torch.int64)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for row, (i, seq) in enumerate(zip(kept, seqs)):
        r, P = rollouts[i], len(prompts[rollouts[i].prompt_index])
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        positions[row, : r.length] = torch.arange(P - 1, P - 1 + r.length)
        tokens[row, : r.length] = r.tokens
        mask[row, : r.length] = True
    return Batch(
        input_ids.to(device), attention.to(device), positions.to(device), tokens.to(device), mask.to(device),
        torch.tensor([rewards[i] for i in kept], dtype=torch.float32, device=device),
        torch.tensor([prompt_ids[rollouts[i].prompt_index] for i in kept], dtype=torch.int64, device=device),
        torch.tensor([len(seq) for seq in seqs], dtype=torch.int64, device=device),
        torch.tensor([rollouts[i].length for i in kept], dtype=torch.int64, device=device),
    )


def micro_batches(batch: Batch, rows: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """``rows`` (indices into ``batch``) cut into length-sorted groups whose padded size (rows x the group's
    longest sequence) stays within ``max_tokens``: a forward over a group pads to that group's longest row
    only, so the update's cost follows the tokens it trains on. A row longer than ``max_tokens`` is a group."""
    seq = batch.seq_lens[rows]
    order = torch.argsort(seq, stable=True)
    sorted_lens = seq[order].tolist()
    groups, start = [], 0
    for i in range(1, len(sorted_lens) + 1):
        if i == len(sorted_lens) or (i - start + 1) * sorted_lens[i] > max_tokens:
            groups.append(rows[order[start:i]])
            start = i
    return groups


def policy_forward(model, value_head: ValueHead | None, batch: Batch, temperature: float, rows: torch.Tensor):
    """Tempered log-probabilities of the generated tokens [n, t] and, with a value head, V(s_t) [n, t], of the
    rollouts ``rows``; t is their longest generation (the columns past it are padding for all of them)."""
    S, T = int(batch.seq_lens[rows].max()), int(batch.lengths[rows].max())
    out = model(input_ids=batch.input_ids[rows, :S], attention_mask=batch.attention_mask[rows, :S],
                output_hidden_states=value_head is not None)
    pos = batch.positions[rows, :T]
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1).gather(2, batch.tokens[rows, :T][..., None])[..., 0]
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1]
        values = value_head(hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])))
    return logprobs, values


@torch.no_grad()
def score_batch(model, value_head: ValueHead | None, batch: Batch, temperature: float, max_tokens: int):
    """``policy_forward`` over the whole batch in micro-batches: logprobs [N, T] and values [N, T] (or None)."""
    N, T = batch.mask.shape
    logprobs = torch.zeros(N, T, device=batch.mask.device)
    values = torch.zeros(N, T, device=batch.mask.device) if value_head is not None else None
    for rows in micro_batches(batch, torch.arange(N, device=batch.mask.device), max_tokens):
        lp, v = policy_forward(model, value_head, batch, temperature, rows)
        logprobs[rows, : lp.shape[1]] = lp
        if values is not None:
            values[rows, : v.shape[1]] = v
    return logprobs, values


def minibatch_backward(model, value_head: ValueHead | None, batch: Batch, rows: torch.Tensor, old_logprobs: torch.Tensor,
                       old_values: torch.Tensor | None, advantages: torch.Tensor, returns: torch.Tensor | None,
                       ref_logprobs: torch.Tensor | None, cfg: TrainConfig) -> dict[str, float]:
    """Backpropagate one minibatch's PPO loss (policy + vf_coef * value + kl_coef * KL, each a mean over the
    minibatch's tokens) micro-batch by micro-batch; return the loss terms and the clip statistics.

    Each micro-batch's means are weighted by its share of the minibatch's tokens, so the loss and the
    gradients are those of one forward over the whole minibatch padded to its longest row."""
    n_tokens = batch.mask[rows].sum().clamp(min=1)
    totals = dict.fromkeys(("policy_loss", "value_loss", "kl", "clip_fraction", "approx_kl"), 0.0)
    for g in micro_batches(batch, rows, cfg.update_tokens):
        logprobs, values = policy_forward(model, value_head, batch, cfg.temperature, g)
        t = logprobs.shape[1]
        m = batch.mask[g, :t]
        share = m.sum() / n_tokens
        loss, info = policy_loss(logprobs, old_logprobs[g, :t], advantages[g, :t], m, clip=cfg.clip)
        terms = {"policy_loss": loss.detach(), **info}
        if returns is not None:
            terms["value_loss"] = value_loss(values, returns[g, :t], m, old_values=old_values[g, :t], clip=cfg.value_clip)
            loss = loss + cfg.vf_coef * terms["value_loss"]
        if ref_logprobs is not None:
            terms["kl"] = kl_penalty(logprobs, ref_logprobs[g, :t], m)
            loss = loss + cfg.kl_coef * terms["kl"]
        (loss * share).backward()
        w = float(share)
        for k, v in terms.items():
            totals[k] += w * float(v.detach() if isinstance(v, torch.Tensor) else v)
    return totals


# ------------------------------------------------------------------------------------ the run folder

CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE = "checkpoint.pt", "config.json", "metrics.jsonl"
# What a resumed run may change: where the folder is now, how long the run is, where it runs, its learning rate
# (to recover from a divergence), diagnostics.
RESUMABLE_CHANGES = ("out_dir", "steps", "device", "lr", "eval_every", "check_false_stops", "false_stop_sample")
_CHECKPOINT_KEYS = ("config", "step", "history", "model", "value_head", "optimizer", "stopper", "allocator", "warmup")


class TrainingDiverged(RuntimeError):
    """A loss, gradient or parameter stopped being finite; nothing of that step was written."""


def _read_checkpoint(ckpt_path: Path, expected_config: dict[str, Any] | None = None) -> dict[str, Any]:
    state = load_checkpoint(ckpt_path, expected_config=expected_config, may_differ=RESUMABLE_CHANGES)
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {ckpt_path} lacks {', '.join(missing)}: it was not written by espo's trainer")
    return state


def resume_config(out_dir: str | os.PathLike, **changes: Any) -> TrainConfig:
    """The configuration of the run in ``out_dir`` (read from its checkpoint), with ``changes`` applied.

    ``espo`` in ``changes`` may be a dict of the stop settings to change. The run is resumed from wherever
    the folder is now: ``out_dir`` is set to it.
    """
    saved = dict(_read_checkpoint(Path(out_dir) / CHECKPOINT_FILE)["config"])
    saved["espo"] = {**saved.get("espo", {}), **changes.pop("espo", {})}
    return TrainConfig(**{**saved, **changes, "out_dir": str(out_dir)})


def _resume_state(cfg: TrainConfig, ckpt_path: Path) -> dict[str, Any]:
    """The checkpoint to continue ``cfg`` from, refused when it was written under other settings."""
    state = _read_checkpoint(ckpt_path, expected_config=cfg.to_dict())
    done = int(state["step"]) + 1
    if cfg.steps < done:
        raise ValueError(f"the run in {ckpt_path.parent} has already done {done} steps; resume with steps >= {done}")
    planned = int(state["config"]["steps"])
    if cfg.steps != planned and ALGOS[cfg.algo][2]:
        raise ValueError(f"{cfg.algo} spreads its rollout budget over the {planned} planned steps, so its run cannot be "
                         f"extended to {cfg.steps}; start a new run folder with the longer plan")
    return state


def _claim_run_folder(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir`` ready for a new run: refuse one that holds a run unless ``overwrite``; check it is writable."""
    held = [name for name in (CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE) if (out_dir / name).exists()]
    if held and not overwrite:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --resume, choose another "
                         "--out-dir, or pass --overwrite to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".espo-write-check"
        probe.write_bytes(b"")
        probe.unlink()
        for name in held:
            (out_dir / name).unlink()
    except OSError as err:
        raise ValueError(f"cannot write the run folder {out_dir} ({err.strerror or err}); choose a writable --out-dir") from None


def _diverged(what: str, cfg: TrainConfig, step: int, ckpt_path: Path) -> TrainingDiverged:
    kept = (f"the last good checkpoint (after step {step - 1}) is kept at {ckpt_path}; resume from it with --resume "
            "and a lower --lr") if ckpt_path.is_file() else "no checkpoint had been written yet"
    return TrainingDiverged(
        f"training diverged at step {step}: {what} is not finite. The usual cause is a learning rate too high for this "
        f"model (lr={cfg.lr}, max_grad_norm={cfg.max_grad_norm}); lower --lr. Nothing of this step was written: {kept}"
    )


# ----------------------------------------------------------------------------------------- the loop


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
) -> TrainResult:
    """Run ``cfg``; metrics go to ``out_dir/metrics.jsonl`` and an atomic checkpoint after every step.

    ``resume`` continues the run whose checkpoint is in ``out_dir`` (its configuration must match ``cfg`` but
    for ``RESUMABLE_CHANGES``; a larger ``steps`` extends a finished run). Without it a folder that holds a
    run is refused unless ``overwrite`` is given. A loss, gradient or parameter that stops being finite
    raises ``TrainingDiverged`` before anything is written, so the last good checkpoint survives.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(cfg).__name__}")
    rank, world = _distributed(cfg.device)
    critic_mode, stop_mode, cero_mode = ALGOS[cfg.algo]
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT_FILE
    state = _resume_state(cfg, ckpt_path) if resume else None  # checked before any weights are loaded
    if rank == 0 and state is None:
        _claim_run_folder(out_dir, overwrite)
    torch.manual_seed(cfg.seed)

    # --- policy, task, prompts
    model, tokenizer = load_model(cfg.model or builtin_model_path(), device=device, dtype=dtype)
    if task is None:
        task = builtin_task() if cfg.model is None else task_from_checkpoint(cfg.model)
        if task is None:
            raise ValueError(f"{cfg.model} has no card.json naming its task (as scripts/make_tiny_model.py writes): "
                             "a run on your own checkpoint needs your own task, train(cfg, task=...)")
    check_task(task)
    has_oracle = callable(getattr(task, "first_mistake", None))
    if cfg.num_problems < cfg.prompts_per_step:
        raise ValueError(f"num_problems ({cfg.num_problems}) must be >= prompts_per_step ({cfg.prompts_per_step})")
    problems = task_problems(task, cfg.num_problems, seed=cfg.seed)
    eval_set = task_problems(task, cfg.eval_problems, seed=cfg.seed + 1_000_003) if cfg.eval_problems else []
    prompts = [_encode(tokenizer, p.prompt) for p in problems]
    eval_prompts = [_encode(tokenizer, p.prompt) for p in eval_set]
    eos = tokenizer.eos_token_id
    max_new = cfg.max_new_tokens or int(getattr(task, "max_new_tokens", 128))
    max_len = max(len(p) for p in prompts + eval_prompts) + max_new

    # --- learner state: value head, optimizer, stopper, arming rule, allocator
    hidden = model.config.hidden_size
    value_head = ValueHead(hidden, device=device) if critic_mode else None
    if value_head is not None:
        torch.nn.init.zeros_(value_head.proj.weight)
        torch.nn.init.constant_(value_head.proj.bias, 0.5)
    params = list(model.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.kl_coef > 0 else None  # the initial policy
    decoder = Decoder(model, max_batch=cfg.max_batch, max_seq_len=max_len, device=device, dtype=dtype,
                      value_source=value_head if stop_mode else None)
    stopper = EarlyStopper(cfg.espo, cfg.max_batch, device) if stop_mode else None
    warmup = CriticWarmup(total_steps=cfg.steps)
    if stopper is not None and not critic_mode:
        stopper.arm()  # the posterior mean needs no warm-up
    budget = cfg.cero_budget or cfg.steps * cfg.prompts_per_step * cfg.group_size
    if cero_mode and budget < 2:
        raise ValueError(f"cero_budget ({budget}) is smaller than one group (2 rollouts): raise it or use algo=grpo")
    allocator = (
        CeroAllocator(cfg.num_problems, budget, cfg.steps * cfg.prompts_per_step / cfg.num_problems,
                      n_min=2, n_max=2 * cfg.group_size)
        if cero_mode else None
    )

    history: list[dict] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if value_head is not None:
            value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        if stopper is not None:
            stopper.load_state_dict(state["stopper"])
        if allocator is not None:
            allocator.load_state_dict(state["allocator"])
        warmup = CriticWarmup(**state["warmup"])
        history, start = state["history"], state["step"] + 1
    if rank == 0:
        write_text_atomic(json.dumps(cfg.to_dict(), indent=2), out_dir / CONFIG_FILE)
        write_text_atomic("".join(json.dumps(h) + "\n" for h in history), out_dir / METRICS_FILE)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.algo, unit="step")
    order = np.random.default_rng(cfg.seed).permutation(cfg.num_problems)
    cum_tokens = history[-1]["cum_tokens"] if history else 0
    initial_eval = history[0]["initial_eval_accuracy"] if history else (
        _evaluate(decoder, task, tokenizer, eval_set, eval_prompts, cfg, max_new, eos, rank, world) if eval_set else None
    )
    try:
        for step in range(start, cfg.steps):
            t_step = time.perf_counter()

            # 1. this step's prompts (a deterministic walk over a shuffled prompt set) and their group sizes
            first = step * cfg.prompts_per_step
            ids = order[np.arange(first, first + cfg.prompts_per_step) % cfg.num_problems]  # [P]
            counts = allocator.allocate(ids).numpy() if allocator is not None else np.full(len(ids), cfg.group_size)
            mine = [j for j in range(len(ids)) if j % world == rank and counts[j] > 0]  # this rank's share

            # 2. rollouts: the stopper (if any) stops rows inside the sampling kernel
            prompt_values = None
            if stop_mode and not critic_mode and mine:
                prompt_values = allocator.posterior_mean(ids[mine]).tolist()
            rollouts = decoder.generate(
                [prompts[ids[j]] for j in mine], [int(counts[j]) for j in mine], max_new_tokens=max_new,
                temperature=cfg.temperature, seed=_step_seed(cfg.seed, step, rank), stopper=stopper,
                eos_token_id=eos, prompt_values=prompt_values, progress=False,
            ) if mine else None
            t_rollout = time.perf_counter() - t_step
            if rollouts is not None and all(r.finish_reason == "invalid" for r in rollouts):
                raise TrainingDiverged(f"every rollout of step {step} was invalid: the model's logits are NaN or infinite "
                                       f"(a diverged or broken checkpoint; lr={cfg.lr}). Nothing of this step was written.")

            # 3. rewards: the task's outcome, or r_fail for a stopped rollout (an absorbing failure)
            t_reward = time.perf_counter()
            rewards, successes, wrong = [], np.zeros(len(ids)), []
            for r in rollouts or []:
                j = mine[r.prompt_index]
                if r.finish_reason == "stopped":
                    reward = cfg.espo.r_fail
                else:
                    reward = score(task, problems[ids[j]], tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True))
                    successes[j] += reward >= cfg.success_threshold
                    if reward < cfg.success_threshold:
                        wrong.append(r)
                rewards.append(reward)
            stopped = [r for r in rollouts or [] if r.finish_reason == "stopped"]
            stop_report = stopper.end_batch(all_reduce=_all_reduce) if stopper is not None else {}
            successes = _all_reduce(torch.tensor(successes, dtype=torch.float64)).numpy()
            if allocator is not None:
                allocator.update(ids, successes.astype(np.int64), counts)
            t_reward = time.perf_counter() - t_reward

            # diagnostics, timed apart from the step: how many stops were false (a sample of them continued
            # without the stopper), and the tokens after the first mistake of wrong rollouts that ran on (what
            # a perfect stopper would have cut)
            t_measure = time.perf_counter()
            checked = _false_stop_sample(stopped, cfg, step, rank) if cfg.check_false_stops else []
            false_stops = _count_false_stops(decoder, task, tokenizer, problems, prompts, ids, mine, checked, cfg, max_new,
                                             eos) if checked else 0
            doomed = sum(tokens_after_mistake(task, tokenizer, problems[ids[mine[r.prompt_index]]], r.tokens.tolist())
                         for r in wrong) if has_oracle else 0
            t_measure = time.perf_counter() - t_measure

            # 4. advantages
            t_update = time.perf_counter()
            batch = build_batch([prompts[ids[j]] for j in mine], rollouts, rewards, [int(ids[j]) for j in mine],
                                eos if eos is not None else 0, device) if rollouts else None
            stats: dict[str, float] = {}
            if batch is not None:
                old_logprobs, old_values = score_batch(model, value_head, batch, cfg.temperature, cfg.update_tokens)
                ref_logprobs = score_batch(reference, None, batch, cfg.temperature, cfg.update_tokens)[0] \
                    if reference is not None else None
                N, T = batch.mask.shape
                last = batch.mask.sum(1) - 1  # the index of each rollout's final token
                if critic_mode:
                    token_rewards = torch.zeros(N, T, device=device).scatter(1, last[:, None], batch.rewards[:, None])
                    advantages, returns = gae(token_rewards, old_values, batch.mask, gamma=cfg.gamma, lam=cfg.lam)
                    live = advantages[batch.mask]
                    advantages = (advantages - live.mean()) / (live.std() + 1e-6) * batch.mask if live.numel() > 1 else advantages
                else:
                    advantages = group_advantages(batch.rewards, batch.group)[:, None].expand(N, T) * batch.mask
                    returns = None

                # 5. PPO epochs over minibatches; gradients averaged across ranks
                perm_gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank, salt=1))
                sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "kl": 0.0}
                updates = 0
                for _ in range(cfg.ppo_epochs):
                    for rows in torch.randperm(N, generator=perm_gen).to(device).chunk(cfg.minibatches):
                        optimizer.zero_grad(set_to_none=True)
                        terms = minibatch_backward(model, value_head, batch, rows, old_logprobs, old_values, advantages,
                                                   returns, ref_logprobs, cfg)
                        for name, what in (("policy_loss", "the policy loss"), ("value_loss", "the value loss"),
                                           ("kl", "the KL penalty")):
                            sums[name] += _finite(terms[name], what, cfg, step, ckpt_path)
                        for p in params:
                            if p.grad is not None and world > 1:
                                _all_reduce(p.grad).div_(world)
                        _finite(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm), "the gradient norm", cfg, step, ckpt_path)
                        optimizer.step()
                        sums["clip_fraction"] += terms["clip_fraction"]
                        sums["approx_kl"] += terms["approx_kl"]
                        updates += 1
                stats = {k: v / max(updates, 1) for k, v in sums.items()}
            if world > 1:  # logged losses are means over ranks
                keys = ["policy_loss", "value_loss", "clip_fraction", "approx_kl", "kl"]
                means = _all_reduce(torch.tensor([stats.get(k, 0.0) for k in keys], dtype=torch.float64)) / world
                stats = dict(zip(keys, means.tolist()))
            if critic_mode:
                critic_loss = stats.get("value_loss", 0.0)
                if stopper is not None and warmup.update(critic_loss, step) and not stopper.armed:
                    stopper.arm()
            t_update = time.perf_counter() - t_update

            # 6. evaluation: sampled accuracy on held-out problems, without stopping (timed apart)
            eval_acc, t_eval = None, time.perf_counter()
            if eval_set and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                eval_acc = _evaluate(decoder, task, tokenizer, eval_set, eval_prompts, cfg, max_new, eos, rank, world)
            t_eval = time.perf_counter() - t_eval

            # 7. metrics and an atomic checkpoint
            totals = _all_reduce(torch.tensor([
                len(rollouts or []), rollouts.tokens_generated if rollouts else 0, len(stopped), false_stops, len(checked),
                _informative_rollouts(batch), doomed,
            ], dtype=torch.float64)).tolist()
            n_roll, n_tok, n_stop, n_false, n_checked, n_inform, n_doomed = totals
            cum_tokens += int(n_tok)
            record = {
                "step": step, "algo": cfg.algo, "rollouts": int(n_roll), "tokens": int(n_tok), "cum_tokens": cum_tokens,
                "success_rate": float(successes.sum() / max(n_roll, 1)), "stop_rate": n_stop / max(n_roll, 1),
                "stopped": int(n_stop), "false_stops": int(n_false), "false_stop_checked": int(n_checked),
                "informative_fraction": n_inform / max(n_roll, 1), "eval_accuracy": eval_acc,
                "doomed_tokens": int(n_doomed) if has_oracle else None,
                "armed": bool(stopper.armed) if stopper is not None else False,
                "beta": stop_report.get("beta"),
                # the step's own cost (what training needs) apart from what measuring it costs
                "rollout_time_s": t_rollout, "reward_time_s": t_reward, "update_time_s": t_update,
                "step_time_s": t_rollout + t_reward + t_update, "measure_time_s": t_measure, "eval_time_s": t_eval,
                "time_s": time.perf_counter() - t_step, **stats,
            }
            if step == 0:
                record["initial_eval_accuracy"] = initial_eval
            history.append(record)
            _finite(torch.nn.utils.get_total_norm(params, norm_type=math.inf), "a parameter", cfg, step, ckpt_path)
            if rank == 0:
                with open(out_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
                save_atomic({
                    "config": cfg.to_dict(), "step": step, "history": history, "model": model.state_dict(),
                    "value_head": value_head.state_dict() if value_head is not None else None,
                    "optimizer": optimizer.state_dict(), "stopper": stopper.state_dict() if stopper is not None else None,
                    "allocator": allocator.state_dict() if allocator is not None else None,
                    "warmup": dataclasses.asdict(warmup),
                }, ckpt_path)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{record['success_rate']:.2f}", stop=f"{record['stop_rate']:.2f}", tokens=cum_tokens)
            if on_step is not None:
                on_step(record)
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(history, model, value_head, stopper, allocator)


def _finite(value: torch.Tensor | float, what: str, cfg: TrainConfig, step: int, ckpt_path: Path) -> float:
    """``float(value)``, or TrainingDiverged when it is NaN or infinite."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise _diverged(what, cfg, step, ckpt_path)
    return v


def _informative_rollouts(batch: Batch | None) -> float:
    """Rollouts in groups whose rewards are not all equal (the groups with a non-zero GRPO advantage)."""
    if batch is None:
        return 0.0
    _, inverse = torch.unique(batch.group, return_inverse=True)
    lo = torch.full((int(inverse.max()) + 1,), math.inf, device=batch.rewards.device).scatter_reduce(0, inverse, batch.rewards, "amin")
    hi = torch.full_like(lo, -math.inf).scatter_reduce(0, inverse, batch.rewards, "amax")
    return float((hi > lo)[inverse].sum())


def _false_stop_sample(stopped: list, cfg: TrainConfig, step: int, rank: int) -> list:
    """The stopped rollouts whose stop is checked: all of them, or a random ``false_stop_sample`` share."""
    if cfg.false_stop_sample >= 1.0 or not stopped:
        return stopped
    rng = np.random.default_rng(_step_seed(cfg.seed, step, rank, salt=2))
    keep = rng.random(len(stopped)) < cfg.false_stop_sample
    return [r for r, k in zip(stopped, keep) if k]


@torch.no_grad()
def _count_false_stops(decoder, task, tokenizer, problems, prompts, ids, mine, stopped, cfg, max_new, eos) -> int:
    """Continue each stopped rollout from scratch with its own seed and no stopper: the same tokens up to
    the stop, then on to the end. A stop was false when that finished rollout is correct."""
    redo = decoder.generate(
        [prompts[ids[mine[r.prompt_index]]] for r in stopped], 1, max_new_tokens=max_new, temperature=cfg.temperature,
        rollout_seeds=[r.seed for r in stopped], eos_token_id=eos, progress=False,
    )
    false = 0
    for r, full in zip(stopped, redo):
        text = tokenizer.decode(full.tokens.tolist(), skip_special_tokens=True)
        false += score(task, problems[ids[mine[r.prompt_index]]], text) >= cfg.success_threshold
    return false


@torch.no_grad()
def _evaluate(decoder, task, tokenizer, eval_set, eval_prompts, cfg, max_new, eos, rank, world) -> float:
    """Sampled (temperature cfg.temperature) accuracy on the held-out problems, the same seeds every time."""
    share = list(range(rank, len(eval_set), world))
    correct = 0.0
    if share:
        out = decoder.generate([eval_prompts[i] for i in share], 1, max_new_tokens=max_new, temperature=cfg.temperature,
                               seed=cfg.seed + 77, eos_token_id=eos, progress=False)
        for i, r in zip(share, out):
            text = tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True)
            correct += score(task, eval_set[i], text) >= cfg.success_threshold
    return float(_all_reduce(torch.tensor([correct], dtype=torch.float64))[0]) / len(eval_set)
