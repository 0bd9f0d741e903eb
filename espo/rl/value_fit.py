"""Value pretraining: fit a value head to the policy's own rollouts, as PPO practitioners do before PPO.

ESPO scales its stop threshold by the critic's value V(s_t), so a stop is only as good as a value that knows which
rollouts are doomed. A freshly initialised head knows nothing (on SmolLM2 it stayed at 0.50, explained variance
0.00, through training). This module fits one before training starts:

1. ``collect``: decode rollouts of training prompts with the policy at its own sampling settings, without stopping,
   and score them; then one teacher-forced forward per batch gives, for every generated token t, the last hidden
   state of the prefix t is drawn from (what ``espo.ValueHead`` reads while decoding) and the features the sampling
   op returns (regret, entropy, the sampled token's log-probability).
2. ``fit_value_head``: a Monte-Carlo target (each token's target is its rollout's outcome), least squares with a
   ridge penalty in closed form, on rollouts of some prompts; its ridge strength picked on rollouts of other
   prompts (never the ones it is scored on).
3. ``value_report``: per-token explained variance on held-out rollouts and calibration tables (predicted against
   observed success by decile of the prediction, and by position in the rollout).
4. ``save_value_head`` / ``load_value_head``: ``value_head.safetensors`` plus ``value_head.json`` (what it was fitted
   on and how well it predicts) in a folder; loading runs no code (safetensors and JSON only).

Shapes: N rollouts, T_i tokens in rollout i, M = sum_i T_i tokens in all, H the model's hidden size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from espo.engine.value_head import ValueHead

HEAD_FILE = "value_head.safetensors"
CARD_FILE = "value_head.json"
RIDGE_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class RolloutFeatures:
    """Unstopped rollouts with every token's features, tokens of all rollouts concatenated in rollout order.

    rollout: int64 [M], the rollout each token belongs to; position: int64 [M], its index t in the rollout.
    hidden: float32 [M, H], the last hidden state of the prefix the token is drawn from.
    regret, entropy, logprob: float32 [M], what ``espo.sample`` returned when the token was drawn.
    prompt: int64 [N], the problem of each rollout; reward: float32 [N]; right: bool [N] (reward >= threshold).
    lengths: int64 [N]; finish: list of N finish reasons.
    """

    rollout: np.ndarray
    position: np.ndarray
    hidden: np.ndarray
    regret: np.ndarray
    entropy: np.ndarray
    logprob: np.ndarray
    prompt: np.ndarray
    reward: np.ndarray
    right: np.ndarray
    lengths: np.ndarray
    finish: list[str] = field(default_factory=list)

    @property
    def target(self) -> np.ndarray:
        """The Monte-Carlo target of every token [M]: its rollout's success (1.0 or 0.0)."""
        return self.right[self.rollout].astype(np.float32)

    def subset(self, rollouts: np.ndarray) -> "RolloutFeatures":
        """The rollouts whose indices are in ``rollouts`` (renumbered 0..n-1 in that order)."""
        rollouts = np.asarray(rollouts, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(self.lengths)])
        idx = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rollouts]) if len(rollouts) else \
            np.zeros(0, dtype=np.int64)
        renumber = np.repeat(np.arange(len(rollouts)), self.lengths[rollouts])
        return RolloutFeatures(
            rollout=renumber, position=self.position[idx], hidden=self.hidden[idx], regret=self.regret[idx],
            entropy=self.entropy[idx], logprob=self.logprob[idx], prompt=self.prompt[rollouts],
            reward=self.reward[rollouts], right=self.right[rollouts], lengths=self.lengths[rollouts],
            finish=[self.finish[r] for r in rollouts])

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write to one ``.npz`` (hidden states as float16), with ``extra`` arrays beside the fields; read back with
        ``RolloutFeatures.load`` (which skips the extras)."""
        arrays = {k: getattr(self, k) for k in ("rollout", "position", "regret", "entropy", "logprob", "prompt",
                                                "reward", "right", "lengths")}
        np.savez(path, hidden=self.hidden.astype(np.float16), finish=np.array(self.finish), **arrays, **extra)

    @classmethod
    def load(cls, path: str | Path) -> "RolloutFeatures":
        names = {f.name for f in dataclasses.fields(cls)}
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files if k in names}
        data["hidden"] = data["hidden"].astype(np.float32)
        data["finish"] = [str(f) for f in data["finish"]]
        return cls(**data)


@torch.no_grad()
def prefix_hidden_states(model: torch.nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                         batch_tokens: int = 8192) -> list[torch.Tensor]:
    """For each (prompt, completion) pair, the final hidden state [T, H] (float32, CPU) of the prefix each
    completion token is drawn from: positions len(prompt)-1 .. len(prompt)+T-2 of prompt + completion.

    One teacher-forced forward per group of sequences (right-padded, at most ``batch_tokens`` padded tokens).
    """
    base = getattr(model, "model", model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    out: list[torch.Tensor | None] = [None] * len(prompts)
    start = 0
    while start < len(order):
        longest = len(prompts[order[start]]) + len(completions[order[start]])
        end = start
        while end < len(order):
            longest = max(longest, len(prompts[order[end]]) + len(completions[order[end]]))
            if (end - start + 1) * longest > batch_tokens and end > start:
                break
            end += 1
        group = order[start:end]
        seqs = [list(prompts[i]) + list(completions[i])[:-1] if len(completions[i]) else list(prompts[i])
                for i in group]
        width = max(map(len, seqs))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float().cpu()
        for row, i in enumerate(group):
            p, t = len(prompts[i]), len(completions[i])
            out[i] = hidden[row, p - 1: p - 1 + t]
        start = end
    return out  # type: ignore[return-value]


class HiddenRecorder(ValueHead):
    """A value source for ``espo.Decoder`` that keeps every hidden state it is given and returns, as each row's
    "value", the index under which it kept it: a rollout's ``values`` then name the hidden states of the prefixes its
    tokens were drawn from, exactly those a ``ValueHead`` would read, at no cost beyond the decode itself."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size)
        self.kept: list[torch.Tensor] = []
        self.count = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.detach().reshape(-1, self.hidden_size).float().cpu()
        self.kept.append(flat)
        ids = torch.arange(self.count, self.count + len(flat), dtype=torch.float32, device=hidden.device)
        self.count += len(flat)
        if self.count >= 2**24:  # float32 holds every integer index below 2^24 exactly
            raise RuntimeError("HiddenRecorder: more than 2^24 hidden states in one decode; decode fewer rollouts")
        return ids.reshape(hidden.shape[:-1])

    def hidden_of(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.kept)[ids.long()]


def features_from_rollouts(model: torch.nn.Module, prompts: Sequence[Sequence[int]], rollouts: Any,
                           rewards: Sequence[float], success_threshold: float = 1.0,
                           hidden: Sequence[torch.Tensor] | None = None) -> RolloutFeatures:
    """``RolloutFeatures`` of ``espo.Decoder.generate``'s ``rollouts`` (unstopped) and their ``rewards``; each
    rollout's hidden states [T, H] are ``hidden`` when given, else one teacher-forced forward recomputes them."""
    rs = list(rollouts)
    if len(rs) != len(rewards):
        raise ValueError(f"rewards must hold one value per rollout ({len(rs)}), got {len(rewards)}")
    if hidden is None:
        hidden = prefix_hidden_states(model, [prompts[r.prompt_index] for r in rs], [r.tokens.tolist() for r in rs])
    lengths = np.array([r.length for r in rs], dtype=np.int64)
    cat = lambda name: np.concatenate([getattr(r, name).float().numpy() for r in rs]) if rs else np.zeros(0)  # noqa: E731
    reward = np.array(rewards, dtype=np.float32)
    return RolloutFeatures(
        rollout=np.repeat(np.arange(len(rs)), lengths), position=np.concatenate([np.arange(n) for n in lengths]),
        hidden=torch.cat(list(hidden)).numpy() if rs else np.zeros((0, 0), np.float32),
        regret=cat("regret"), entropy=cat("entropy"), logprob=cat("raw_logprobs"),
        prompt=np.array([r.prompt_index for r in rs], dtype=np.int64), reward=reward,
        right=reward >= success_threshold, lengths=lengths, finish=[r.finish_reason for r in rs])


@dataclass
class DecodedSet:
    """``decode_features``' result: the features, and per rollout its completion text, tokens and seed."""

    features: RolloutFeatures
    texts: list[str]
    tokens: list[list[int]]
    seeds: list[int]
    seconds: float


def decode_features(model: torch.nn.Module, tokenizer: Any, task: Any, problems: Sequence[Any], samples: int, *,
                    seed: int, temperature: float, top_p: float, max_new_tokens: int, slots: int = 64,
                    success_threshold: float = 1.0, progress: bool = True) -> DecodedSet:
    """Decode ``samples`` unstopped rollouts of each problem with ``espo.Decoder`` (sampling seed ``seed``), score
    them with the task, and return every token's features, the hidden states kept while decoding."""
    import time

    from espo.engine.decoder import Decoder
    from espo.tasks import score
    from espo.tasks.prompting import encode_prompt, stop_token_ids

    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    recorder = HiddenRecorder(model.config.hidden_size)
    dec = Decoder(model, max_batch=min(slots, len(prompts) * samples),
                  max_seq_len=max(map(len, prompts)) + max_new_tokens, value_source=recorder)
    t0 = time.perf_counter()
    out = dec.generate(prompts, samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, eos_token_id=stop_token_ids(tokenizer, model), progress=progress)
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(r.tokens.tolist(), skip_special_tokens=True) for r in out]
    rewards = [score(task, problems[r.prompt_index], t) for r, t in zip(out, texts)]
    feats = features_from_rollouts(model, prompts, out, rewards, success_threshold,
                                   hidden=[recorder.hidden_of(r.values) for r in out])
    return DecodedSet(feats, texts, [r.tokens.tolist() for r in out], [r.seed for r in out], seconds)


# ------------------------------------------------------------------------------------------------ fitting


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - Var(target - pred) / Var(target), over tokens (nan when the target is constant)."""
    var = float(np.var(target))
    return float("nan") if var == 0 else 1.0 - float(np.var(target - pred)) / var


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Least squares of y on x with an L2 penalty ``lam`` on the weights (not the bias), per token;
    features standardised inside. Returns (weight [H], bias) in the original feature scale."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = ((x - mu) / sd).astype(np.float64)
    y_mean = float(y.mean())
    gram = xs.T @ xs + lam * len(xs) / 1000.0 * np.eye(xs.shape[1])
    w = np.linalg.solve(gram, xs.T @ (y - y_mean))
    w_orig = w / sd
    return w_orig.astype(np.float32), float(y_mean - mu @ w_orig)


@dataclass
class FittedValue:
    """A fitted linear value: ``value = clip(hidden @ weight + bias, 0, 1)`` per token."""

    weight: np.ndarray  # [H]
    bias: float
    ridge: float
    selection: dict[str, float]  # ridge strength -> explained variance on the selection rollouts

    def predict(self, hidden: np.ndarray) -> np.ndarray:
        return np.clip(hidden @ self.weight + self.bias, 0.0, 1.0)

    def head(self) -> ValueHead:
        """As an ``espo.ValueHead`` (its output unclipped: the stop rule floors V at value_floor itself)."""
        head = ValueHead(len(self.weight))
        with torch.no_grad():
            head.proj.weight.copy_(torch.from_numpy(self.weight)[None, :])
            head.proj.bias.fill_(self.bias)
        return head


def split_by_prompt(data: RolloutFeatures, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rollout indices (first, second): every rollout of a prompt falls on one side; ``share`` of the prompts
    in the first."""
    prompts = np.unique(data.prompt)
    rng = np.random.default_rng(seed)
    first = set(rng.permutation(prompts)[: max(1, int(round(share * len(prompts))))].tolist())
    mask = np.array([p in first for p in data.prompt])
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def fit_value_head(data: RolloutFeatures, ridges: Sequence[float] = RIDGE_GRID, selection_share: float = 0.2,
                   seed: int = 0) -> FittedValue:
    """A linear value on the hidden state, fitted by ridge least squares to each token's Monte-Carlo target.

    The ridge strength is the one with the best explained variance on the rollouts of ``selection_share`` of the
    prompts, held out from the fit; the head is then refitted on every rollout at that strength.
    """
    if len(data.lengths) < 4 or len(np.unique(data.right)) < 2:
        raise ValueError("fitting a value needs rollouts that end right and rollouts that end wrong; got "
                         f"{int(data.right.sum())} right of {len(data.right)}: decode more rollouts")
    fit_idx, sel_idx = split_by_prompt(data, 1.0 - selection_share, seed)
    fit, sel = data.subset(fit_idx), data.subset(sel_idx)
    scores = {}
    for lam in ridges:
        w, b = ridge(fit.hidden, fit.target, lam)
        scores[f"{lam:g}"] = explained_variance(np.clip(sel.hidden @ w + b, 0, 1), sel.target)
    best = max(ridges, key=lambda lam: -math.inf if math.isnan(scores[f"{lam:g}"]) else scores[f"{lam:g}"])
    w, b = ridge(data.hidden, data.target, best)
    return FittedValue(weight=w, bias=b, ridge=float(best), selection=scores)


# ------------------------------------------------------------------------------------------------ reporting


def calibration_table(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> list[dict[str, float]]:
    """Mean prediction against observed success per group label (e.g. a decile of the prediction)."""
    rows = []
    for g in np.unique(groups):
        m = groups == g
        rows.append({"group": float(g), "tokens": int(m.sum()), "predicted": float(pred[m].mean()),
                     "observed": float(target[m].mean())})
    return rows


POSITION_BINS = (0, 1, 5, 10, 20, 40, 60, 10**9)


def value_report(value: FittedValue, data: RolloutFeatures) -> dict[str, Any]:
    """How well ``value`` predicts ``data``'s outcomes, per token: explained variance overall and by position
    bin, and calibration by decile of the prediction and by position bin."""
    pred, target = value.predict(data.hidden), data.target
    deciles = np.minimum((np.argsort(np.argsort(pred, kind="stable"), kind="stable") * 10) // max(len(pred), 1), 9)
    bins = np.digitize(data.position, POSITION_BINS[1:])
    by_position = calibration_table(pred, target, bins)
    for row in by_position:
        m = bins == row["group"]
        lo, hi = POSITION_BINS[int(row["group"])], POSITION_BINS[int(row["group"]) + 1]
        row["positions"] = f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"
        row["explained_variance"] = explained_variance(pred[m], target[m])
    first = data.position == 0
    return {"explained_variance": explained_variance(pred, target), "tokens": int(len(pred)),
            "rollouts": int(len(data.lengths)), "success": float(data.right.mean()),
            "explained_variance_first_token": explained_variance(pred[first], target[first]),
            "by_decile": calibration_table(pred, target, deciles), "by_position": by_position}


# ------------------------------------------------------------------------------------------------ files


def save_value_head(folder: str | Path, head: ValueHead, card: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``head`` and its ``card`` (what it was fitted on, how well it predicts) into ``folder``.

    An existing head is replaced only with ``overwrite``; each file is written beside its final name and renamed
    into place, so an interrupted write leaves the old head (or none), never half of one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    head_path = folder / HEAD_FILE
    if head_path.exists() and not overwrite:
        raise FileExistsError(f"{head_path} already exists; pass overwrite=True (--overwrite) to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    card = {**card, "hidden_size": head.hidden_size}
    for name, write in ((CARD_FILE, lambda p: Path(p).write_text(json.dumps(card, indent=2) + "\n")),
                        (HEAD_FILE, lambda p: save_file(state, p))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return head_path


def load_value_head(path: str | Path, hidden_size: int | None = None) -> tuple[ValueHead, dict[str, Any]]:
    """A head saved by ``save_value_head``: ``path`` is its folder or its ``value_head.safetensors``. Returns
    (head, card). Reads tensors and JSON only; ``hidden_size`` (the policy's) is checked when given."""
    from safetensors.torch import load_file

    path = Path(path)
    head_path = path / HEAD_FILE if path.is_dir() else path
    if not head_path.is_file():
        raise FileNotFoundError(f"no value head at {str(path)!r} (expected {HEAD_FILE}); fit one with "
                                "`espo value fit --model DIR --out DIR`")
    card_path = head_path.with_name(CARD_FILE)
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    state = load_file(str(head_path))
    weight = state.get("proj.weight")
    if set(state) != {"proj.weight", "proj.bias"} or weight.ndim != 2 or weight.shape[0] != 1:
        raise ValueError(f"{head_path} is not a value head written by espo (tensors {sorted(state)}); refit it")
    size = int(state["proj.weight"].shape[1])
    if hidden_size is not None and size != hidden_size:
        raise ValueError(f"the value head at {str(head_path)!r} reads hidden states of size {size}, but the model's "
                         f"are {hidden_size}: it was fitted on another model; refit it on this one")
    head = ValueHead(size)
    head.load_state_dict(state)
    return head, card


# ------------------------------------------------------------------------------------------------ the command


def fit_value(model_dir: str | os.PathLike, *, problems: int = 256, samples: int = 8, seed: int = 0,
              temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 0, slots: int = 64,
              held_out: float = 0.2, progress: bool = True, log: Any = print) -> tuple[ValueHead, dict[str, Any]]:
    """``espo value fit``: decode ``samples`` rollouts of ``problems`` training problems (the task of the model's
    card.json, drawn with ``seed`` as ``espo train --seed`` draws its training prompts), fit a linear value head on
    the rollouts of ``1 - held_out`` of the problems and report how it predicts the rest. Returns (head, card)."""
    from datetime import datetime, timezone

    from espo.engine.models import load_model
    from espo.tasks import task_from_checkpoint, task_problems

    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be between 0 and 1 (the share of problems kept for the report), "
                         f"got {held_out}")
    model, tokenizer = load_model(model_dir)
    task = task_from_checkpoint(model_dir)
    if task is None:
        raise ValueError(f"{model_dir} has no card.json naming its task; fit from Python with decode_features and "
                         "fit_value_head on your own task")
    max_new = max_new_tokens or int(getattr(task, "max_new_tokens", 128))
    probs = task_problems(task, problems, seed=seed)
    log(f"decoding {problems} problems x {samples} rollouts (temperature {temperature}, top_p {top_p}, "
        f"<= {max_new} new tokens)")
    got = decode_features(model, tokenizer, task, probs, samples, seed=seed, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new, slots=slots, progress=progress)
    data = got.features
    fit_idx, test_idx = split_by_prompt(data, 1.0 - held_out, seed)
    fitted = fit_value_head(data.subset(fit_idx), seed=seed)
    report = value_report(fitted, data.subset(test_idx))
    card = {"model": str(Path(model_dir).resolve()), "task": getattr(task, "config", lambda: {})(),
            "problems": problems, "samples": samples, "seed": seed, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": max_new, "rollouts": int(len(data.lengths)), "success": float(data.right.mean()),
            "decode_seconds": got.seconds, "ridge": fitted.ridge, "held_out_share": held_out,
            "held_out": report, "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    log(f"held-out per-token explained variance {report['explained_variance']:.3f} on {report['rollouts']} rollouts "
        f"of {len(np.unique(data.prompt[test_idx]))} problems the head was not fitted on (success "
        f"{report['success']:.1%})")
    return fitted.head(), card
