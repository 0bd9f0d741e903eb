"""Compare CERO with uniform GRPO, DAPO dynamic sampling, a Knapsack-RL value rule and MoPPS.

Two experiments on simulated Bernoulli prompts (the model below), every method at the same total
rollout budget:

1. *Drifting policy*: success rates improve with the informative groups each prompt receives. Reports
   the fraction of rollouts that land in mixed groups (non-zero GRPO advantage) and the final mean
   success rate.
2. *Regret*: a fixed policy, CERO's utility ``sum_i v_i k (1 - exp(-X_i / k))`` with the true
   ``v_i = p_i (1 - p_i)``; regret after K epochs = offline optimum (water-filling with the true p_i)
   minus the utility a method attains, for growing K (budget ``K * N * n_ref``). The log-log slope of
   CERO's regret is fitted; below 1 means sublinear.

Writes studies/results/allocation.{json,md,png} (``--out DIR`` to write elsewhere).

    python studies/simulate_allocation.py           # full run (a few minutes on 2 cores at most)
    python studies/simulate_allocation.py --quick   # CI-sized

The simulated prompts. A prompt ``i`` is a Bernoulli arm whose success probability under the current policy is
``p_i = sigmoid(a_i + s)``: ``a_i`` is the prompt's own difficulty, ``s`` a global skill shared by all
prompts. A GRPO group of ``n`` rollouts on prompt ``i`` draws ``Binomial(n, p_i)`` successes; it is
*informative* (non-zero advantage) when it is mixed, ``0 < successes < n``.

Policy improvement (``drift=True``) is driven by the informative groups a prompt receives, which is
what GRPO learns from: after each training step,

    a_i += lr_prompt  * I_i / n_ref                (its own informative rollouts)
    s   += lr_global * sum_j I_j / (N * n_ref)     (transfer to every prompt)

with ``I_i`` the rollouts of prompt ``i``'s trained group if it was mixed (else 0). Groups with
all-0 or all-1 rewards teach nothing. There is no batch-size normalisation: a rollout in a mixed
group helps the same whether the rest of its batch was informative or not.

Methods (all at the same total budget ``B = epochs * N * n_ref``; every generated rollout counts as
spent, including groups that a method drops):

* ``uniform``  GRPO: ``n_ref`` rollouts for each prompt of each scheduled batch.
* ``dapo``     DAPO dynamic sampling: generate ``n_ref`` rollouts for prompts from the shuffled stream,
  drop all-0/all-1 groups, and keep generating until a full batch of ``M`` mixed groups is collected;
  extra mixed groups are carried over to the next step (nothing informative is thrown away).
* ``knapsack`` Knapsack-RL-style: per step, maximise ``sum_i P(mixed | p_i, n_i) * p_i (1 - p_i)^2``
  over ``n_i in {0} U [n_min, n_max]`` subject to the step's budget, with ``p_i`` the smoothed success
  rate of the prompt's last group (0.5 when unseen); solved by Lagrangian bisection plus a greedy fill.
* ``mopps``    MoPPS-style: Beta posteriors (same prior and forgetting as CERO), Thompson-sample
  ``p~_i`` for every prompt of the dataset, train on the ``M`` prompts with ``p~`` closest to 0.5,
  ``n_ref`` rollouts each.
* ``cero``     ``espo.rl.allocator.CeroAllocator`` on the scheduled batches.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as `python3 studies/x.py`: this checkout's root first (see studies/common.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from espo.rl.allocator import CeroAllocator
from studies.common import RESULTS, write_report

METHODS = ("uniform", "dapo", "knapsack", "mopps", "cero")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_population(num_prompts: int, seed: int) -> np.ndarray:
    """Prompt logits of a reasoning-like data set: many hard, some easy, the rest in between."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=num_prompts, p=[0.35, 0.15, 0.50])
    centre = np.array([-4.0, 3.5, -0.5])[kind]
    spread = np.array([1.2, 1.0, 1.5])[kind]
    return centre + spread * rng.standard_normal(num_prompts)


# --------------------------------------------------------------------------------------------------
# simulated policy and bookkeeping
# --------------------------------------------------------------------------------------------------
@dataclass
class SimConfig:
    num_prompts: int = 512
    batch_size: int = 128  # M prompts per training step
    epochs: int = 16
    n_ref: int = 8  # GRPO's fixed group size; B = epochs * N * n_ref
    n_min: int = 2
    n_max: int = 16
    drift: bool = True
    lr_prompt: float = 0.15
    lr_global: float = 0.25
    forgetting: float = 0.8  # CERO's and MoPPS's per-epoch forgetting when drift is on

    @property
    def budget(self) -> int:
        return self.epochs * self.num_prompts * self.n_ref


@dataclass
class Sim:
    """One run: the policy state, the rollout sampler and the metrics of one method."""

    cfg: SimConfig
    logits: np.ndarray  # a_i
    rng: np.random.Generator
    skill: float = 0.0
    spent: int = 0
    informative: int = 0
    trained_informative: int = 0
    alloc: np.ndarray = field(default=None)  # type: ignore[assignment]
    curve: list = field(default_factory=list)  # (spent, mean success)
    _order: np.ndarray = field(default=None)  # type: ignore[assignment]
    _pos: int = 0
    epoch_of_stream: int = 0

    def __post_init__(self) -> None:
        self.logits = self.logits.astype(np.float64).copy()
        self.alloc = np.zeros(self.logits.size, dtype=np.int64)
        self.curve.append((0, self.success_rate()))

    @property
    def remaining(self) -> int:
        return self.cfg.budget - self.spent

    def p(self, ids: np.ndarray | None = None) -> np.ndarray:
        z = self.logits + self.skill
        return sigmoid(z if ids is None else z[ids])

    def success_rate(self) -> float:
        return float(self.p().mean())

    def next_prompts(self, m: int) -> np.ndarray:
        """The next ``m`` prompts of a stream of shuffled passes over the data set."""
        out = []
        n = self.logits.size
        while m > 0:
            if self._order is None or self._pos >= n:
                self._order = self.rng.permutation(n)
                self._pos = 0
                self.epoch_of_stream += 1
            take = min(m, n - self._pos)
            out.append(self._order[self._pos:self._pos + take])
            self._pos += take
            m -= take
        return np.concatenate(out)

    def rollout(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Sample the groups; charge them to the budget; return the successes."""
        counts = np.asarray(counts, dtype=np.int64)
        assert counts.sum() <= self.remaining, "a method overspent its budget"
        succ = self.rng.binomial(counts, self.p(ids))
        mixed = (succ > 0) & (succ < counts)
        self.spent += int(counts.sum())
        self.informative += int(counts[mixed].sum())
        np.add.at(self.alloc, ids, counts)
        return succ

    def train(self, ids: np.ndarray, counts: np.ndarray, succ: np.ndarray) -> None:
        """One policy step on the given groups (only the mixed ones carry signal)."""
        counts = np.asarray(counts)
        mixed = (succ > 0) & (succ < counts)
        inf = np.where(mixed, counts, 0).astype(np.float64)
        self.trained_informative += int(inf.sum())
        if self.cfg.drift:
            c = self.cfg
            np.add.at(self.logits, ids, c.lr_prompt * inf / c.n_ref)
            self.skill += c.lr_global * inf.sum() / (self.logits.size * c.n_ref)
        self.curve.append((self.spent, self.success_rate()))


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------
def _pace(sim: Sim, m: int, visits_left: int) -> int:
    """The step budget of the batch-scheduled peers: remaining * m / remaining visits."""
    if visits_left <= m:
        return sim.remaining
    return int(math.floor(sim.remaining * m / visits_left))


def run_uniform(sim: Sim) -> None:
    c = sim.cfg
    steps = math.ceil(c.num_prompts / c.batch_size) * c.epochs
    for _ in range(steps):
        ids = sim.next_prompts(min(c.batch_size, sim.remaining // c.n_ref))
        if ids.size == 0:
            break
        counts = np.full(ids.size, c.n_ref)
        sim.train(ids, counts, sim.rollout(ids, counts))


def run_dapo(sim: Sim) -> None:
    c = sim.cfg
    kept_ids: list[np.ndarray] = []
    kept_n: list[np.ndarray] = []
    kept_s: list[np.ndarray] = []
    while True:
        have = sum(x.size for x in kept_ids)
        if have >= c.batch_size or sim.remaining < c.n_ref:
            if have == 0:
                break
            ids, n, s = (np.concatenate(v) for v in (kept_ids, kept_n, kept_s))
            take = min(c.batch_size, ids.size)
            sim.train(ids[:take], n[:take], s[:take])
            kept_ids, kept_n, kept_s = [ids[take:]], [n[take:]], [s[take:]]
            continue
        m = min(c.batch_size, sim.remaining // c.n_ref)  # generate a batch, over-sampling as needed
        ids = sim.next_prompts(m)
        counts = np.full(m, c.n_ref)
        succ = sim.rollout(ids, counts)
        mixed = (succ > 0) & (succ < counts)
        kept_ids.append(ids[mixed])
        kept_n.append(counts[mixed])
        kept_s.append(succ[mixed])
        if sim.remaining < c.n_ref and sum(x.size for x in kept_ids) == 0:
            break


def _knapsack(p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """max sum_i value_i(n_i), n_i in {0} U [n_min, n_max], sum n_i <= budget."""
    m = p_hat.size
    if budget < n_min or m == 0:
        return np.zeros(m, dtype=np.int64)
    sizes = np.arange(n_max + 1)
    p = p_hat[:, None]
    mixed = 1.0 - p ** sizes - (1.0 - p) ** sizes
    gain = p_hat * (1.0 - p_hat) ** 2
    val = mixed * gain[:, None]
    allowed = (sizes == 0) | (sizes >= n_min)
    val = np.where(allowed[None, :], val, -np.inf)

    def pick(mu: float) -> np.ndarray:
        return np.argmax(val - mu * sizes[None, :], axis=1)

    lo, hi = 0.0, float(np.nanmax(val[:, 1:]) if n_max >= 1 else 1.0) + 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if pick(mid).sum() > budget:
            lo = mid
        else:
            hi = mid
    n = pick(hi).astype(np.int64)
    # greedy fill of the leftover by best marginal value per rollout
    left = budget - int(n.sum())
    while left > 0:
        cur = val[np.arange(m), n]
        best, best_i, best_n = 0.0, -1, 0
        for step in range(1, min(left, n_max) + 1):
            nxt = np.minimum(n + step, n_max)
            ok = (nxt - n == step) & allowed[nxt]
            gain_step = np.where(ok, (val[np.arange(m), nxt] - cur) / step, -np.inf)
            i = int(np.argmax(gain_step))
            if gain_step[i] > best:
                best, best_i, best_n = gain_step[i], i, step
        if best_i < 0:
            break
        n[best_i] += best_n
        left -= best_n
    return n


def run_knapsack(sim: Sim) -> None:
    c = sim.cfg
    p_hat = np.full(c.num_prompts, 0.5)
    visits_left = c.epochs * c.num_prompts
    steps = math.ceil(c.num_prompts / c.batch_size) * c.epochs
    for _ in range(steps):
        ids = sim.next_prompts(c.batch_size)
        budget = _pace(sim, ids.size, visits_left)
        visits_left -= ids.size
        counts = _knapsack(p_hat[ids], budget, c.n_min, c.n_max)
        succ = sim.rollout(ids, counts)
        seen = counts > 0
        p_hat[ids[seen]] = (succ[seen] + 0.5) / (counts[seen] + 1.0)
        sim.train(ids, counts, succ)


def run_mopps(sim: Sim) -> None:
    c = sim.cfg
    a = np.ones(c.num_prompts)
    b = np.ones(c.num_prompts)
    steps_per_epoch = math.ceil(c.num_prompts / c.batch_size)
    rho = c.forgetting if c.drift else 1.0
    for step in range(steps_per_epoch * c.epochs):
        if step and step % steps_per_epoch == 0 and rho < 1.0:
            a = 1.0 + rho * (a - 1.0)
            b = 1.0 + rho * (b - 1.0)
        m = min(c.batch_size, sim.remaining // c.n_ref)
        if m == 0:
            break
        p_tilde = sim.rng.beta(a, b)
        ids = np.argsort(np.abs(p_tilde - 0.5), kind="stable")[:m]
        counts = np.full(m, c.n_ref)
        succ = sim.rollout(ids, counts)
        a[ids] += succ
        b[ids] += counts - succ
        sim.train(ids, counts, succ)


def run_cero(sim: Sim, **kwargs) -> CeroAllocator:
    c = sim.cfg
    opts = dict(n_min=c.n_min, n_max=c.n_max, forgetting=c.forgetting if c.drift else 1.0)
    opts.update(kwargs)
    alloc = CeroAllocator(c.num_prompts, c.budget, c.epochs, **opts)
    steps = math.ceil(c.num_prompts / c.batch_size) * c.epochs
    for _ in range(steps):
        ids = sim.next_prompts(c.batch_size)
        counts = alloc.allocate(ids).numpy()
        succ = sim.rollout(ids, counts)
        alloc.update(ids, succ, counts)
        sim.train(ids, counts, succ)
    return alloc


RUNNERS = {"uniform": run_uniform, "dapo": run_dapo, "knapsack": run_knapsack,
           "mopps": run_mopps, "cero": run_cero}


def simulate(method: str, cfg: SimConfig, seed: int, logits: np.ndarray | None = None, **kwargs) -> Sim:
    """Run one method for one seed; returns the finished ``Sim`` (metrics inside)."""
    if logits is None:
        logits = make_population(cfg.num_prompts, seed)
    sim = Sim(cfg, logits, np.random.default_rng(seed + 1000 * (1 + METHODS.index(method))))
    RUNNERS[method](sim, **kwargs)
    return sim


# --------------------------------------------------------------------------------------------------
# regret against the offline optimum (fixed utilities)
# --------------------------------------------------------------------------------------------------
def utility(x: np.ndarray, v: np.ndarray, k: float) -> float:
    """sum_i v_i k (1 - exp(-X_i / k)), CERO's default utility with the true v_i = p_i (1 - p_i)."""
    return float(np.sum(v * k * (1.0 - np.exp(-np.asarray(x, dtype=np.float64) / k))))


def offline_optimum(v: np.ndarray, budget: float, k: float, x_cap: float) -> tuple[float, np.ndarray]:
    """max sum_i U_i(X_i) s.t. sum X_i <= budget, 0 <= X_i <= x_cap: water-filling by bisection on lambda.

    KKT: X_i = clip(k ln(v_i / lambda), 0, x_cap). Continuous relaxation, so an upper bound on what
    any integer allocation attains.
    """
    v = np.asarray(v, dtype=np.float64)

    def x_of(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.clip(k * np.log(np.maximum(v, 1e-300) / lam), 0.0, x_cap)

    if x_of(1e-300).sum() <= budget:
        x = x_of(1e-300)
        return utility(x, v, k), x
    lo, hi = 1e-300, float(v.max())
    for _ in range(200):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if x_of(mid).sum() > budget:
            lo = mid
        else:
            hi = mid
    x = x_of(hi)
    return utility(x, v, k), x


def regret_run(method: str, num_prompts: int, epochs: int, seed: int, n_ref: int = 8, batch_size: int | None = None,
               n_min: int = 2, n_max: int = 64, pop_seed: int = 0, **kwargs) -> dict:
    """One fixed-population run with full-batch steps; regret = OPT - U(X) with the true p_i."""
    cfg = SimConfig(num_prompts=num_prompts, batch_size=batch_size or max(1, num_prompts // 4), epochs=epochs,
                    n_ref=n_ref, n_min=n_min, n_max=n_max, drift=False)
    logits = make_population(num_prompts, pop_seed)
    sim = simulate(method, cfg, seed, logits=logits, **kwargs)
    p = sigmoid(logits)
    v = p * (1.0 - p)
    k = CeroAllocator(num_prompts, cfg.budget, epochs, n_min=n_min, n_max=n_max,
                      saturation=kwargs.get("saturation")).saturation  # CERO's utility scale
    opt, x_opt = offline_optimum(v, cfg.budget, k, math.inf)
    got = utility(sim.alloc, v, k)
    return {"opt_cap_slack": epochs * n_max - float(x_opt.max()), "opt": opt, "utility": got, "regret": opt - got,
            "spent": sim.spent, "budget": cfg.budget,
            "informative_fraction": sim.informative / max(sim.spent, 1)}


# --------------------------------------------------------------------------------------------------
# the two experiments and their report
# --------------------------------------------------------------------------------------------------
LABELS = {"uniform": "GRPO uniform", "dapo": "DAPO dynamic sampling", "knapsack": "Knapsack-RL value rule",
          "mopps": "MoPPS Thompson", "cero": "CERO (espo)"}
MARKERS = {"uniform": "s-", "dapo": "^--", "knapsack": "o-", "mopps": "o-", "cero": "o-"}
COLORS = {"uniform": "#7f7f7f", "dapo": "#1f77b4", "knapsack": "#2ca02c", "mopps": "#9467bd", "cero": "#d62728"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (full 8, quick 2)")
    ap.add_argument("--num-prompts", type=int, default=None, help="prompts in the drift run (full 512, quick 128)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per step (full 128, quick 32)")
    ap.add_argument("--epochs", type=int, default=16, help="epochs of the drift run")
    ap.add_argument("--n-ref", type=int, default=8, help="GRPO group size; budget = epochs * prompts * n_ref")
    ap.add_argument("--forgetting", type=float, default=0.8, help="CERO's and MoPPS's forgetting in the drift run")
    ap.add_argument("--regret-prompts", type=int, default=128, help="prompts in the regret run")
    ap.add_argument("--horizons", type=int, nargs="+", default=None,
                    help="epochs K of the regret run (full 4..512, quick 4..32)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 8
    if args.num_prompts is None:
        args.num_prompts = 128 if args.quick else 512
    if args.batch_size is None:
        args.batch_size = 32 if args.quick else 128
    if args.horizons is None:
        args.horizons = [4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64, 128, 256, 512]
    return args


def run_all(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    cfg = SimConfig(num_prompts=args.num_prompts, batch_size=args.batch_size, epochs=args.epochs,
                      n_ref=args.n_ref, forgetting=args.forgetting)
    grid = np.linspace(0, cfg.budget, 101)
    drift: dict[str, dict] = {}
    regret: dict[str, dict] = {m: {"horizons": args.horizons, "regret": [], "regret_std": [],
                                   "relative": [], "informative_fraction": []} for m in METHODS}
    total = len(METHODS) * args.seeds * (1 + len(args.horizons))
    bar = tqdm(total=total, desc="allocation sim", unit="run")
    for m in METHODS:
        inf, succ, curves, spent = [], [], [], []
        for seed in range(args.seeds):
            sim = simulate(m, cfg, seed)
            assert sim.spent <= cfg.budget
            inf.append(sim.informative / sim.spent)
            succ.append(sim.success_rate())
            spent.append(sim.spent)
            xs, ys = zip(*sim.curve)
            curves.append(np.interp(grid, xs, ys, right=ys[-1]))
            bar.update()
        drift[m] = {
            "informative_fraction": float(np.mean(inf)), "informative_fraction_std": float(np.std(inf)),
            "final_success": float(np.mean(succ)), "final_success_std": float(np.std(succ)),
            "initial_success": float(sim.curve[0][1]), "spent_mean": float(np.mean(spent)),
            "curve_spent": grid.tolist(), "curve_success": np.mean(curves, axis=0).tolist(),
        }
    for m in METHODS:
        for K in args.horizons:
            rr = []
            for seed in range(args.seeds):
                rr.append(regret_run(m, args.regret_prompts, K, seed, n_ref=args.n_ref))
                bar.update()
            reg = np.array([r["regret"] for r in rr])
            regret[m]["regret"].append(float(reg.mean()))
            regret[m]["regret_std"].append(float(reg.std()))
            regret[m]["relative"].append(float(np.mean([r["regret"] / r["opt"] for r in rr])))
            regret[m]["informative_fraction"].append(float(np.mean([r["informative_fraction"] for r in rr])))
            assert min(r["opt_cap_slack"] for r in rr) > 0, "the per-visit cap binds at the optimum"
    bar.close()
    for m in METHODS:
        ks, rs = np.array(args.horizons, float), np.array(regret[m]["regret"])
        ok = rs > 0
        regret[m]["loglog_slope"] = float(np.polyfit(np.log(ks[ok]), np.log(rs[ok]), 1)[0]) if ok.sum() >= 2 else None
    return {"config": {**vars(cfg), "budget": cfg.budget}, "drift": drift, "regret": regret}


ALLOCATOR = [  # what the simulated allocator is and how a run uses it, above the results
    "`espo.CeroAllocator` decides how many rollouts each prompt of a batch gets under one rollout budget for the "
    "whole run: a Beta posterior per prompt, the value `E[p(1-p)]` of more rollouts, a saturating utility of each "
    "prompt's cumulative rollouts, and online dual prices that pace the budget across epochs. Counts are 0 or in "
    "`[n_min, n_max]`; the budget is never exceeded and is spent to within one group; `state_dict()` resumes a run "
    "exactly.",
    "",
    "```python",
    "from espo import CeroAllocator",
    "alloc = CeroAllocator(num_prompts=len(dataset), total_budget=epochs * len(dataset) * 8, epochs=epochs)",
    "counts = alloc.allocate(batch_ids)          # torch.int64, one group size per prompt",
    "...                                         # generate counts[i] rollouts for prompt i, score them",
    "alloc.update(batch_ids, successes, counts)  # Beta posteriors",
    "baseline = alloc.posterior_mean(batch_ids, device='cuda')  # critic-free value for ESPO",
    "```",
]


def write_markdown(res: dict, meta: dict, path: Path) -> str:
    cfg, drift, regret = res["config"], res["drift"], res["regret"]
    hs = regret["cero"]["horizons"]
    lines = [
        "# Rollout allocation at an equal budget (simulated)",
        "",
        *ALLOCATOR,
        "",
        f"{meta['date']} · numpy {meta['numpy']} · torch {meta['torch']} · Python {meta['python']} · "
        f"{meta['cpus']} CPU cores · {meta['seconds']:.0f} s",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Drift run: {cfg['num_prompts']} prompts, batches of {cfg['batch_size']}, {cfg['epochs']} epochs, "
        f"budget {cfg['budget']} rollouts (= epochs x prompts x {cfg['n_ref']}), groups in "
        f"[{cfg['n_min']}, {cfg['n_max']}], forgetting {cfg['forgetting']} for CERO and MoPPS, "
        f"{meta['seeds']} seeds (mean ± std). Initial mean success {drift['cero']['initial_success']:.3f}.",
        f"Regret run: {meta['regret_prompts']} fixed prompts, budget K x prompts x {cfg['n_ref']}, "
        "regret = offline optimum - attained utility (CERO's default utility, true p_i), mean over seeds.",
        "",
        "| method | informative-rollout fraction | final success rate | "
        + " | ".join(f"regret K={k}" for k in hs) + " | regret slope |",
        "|---|---|---|" + "---|" * len(hs) + "---|",
    ]
    for m in METHODS:
        d, r = drift[m], regret[m]
        slope = "-" if r["loglog_slope"] is None else f"{r['loglog_slope']:.2f}"
        lines.append(
            f"| {LABELS[m]} | {d['informative_fraction']:.3f} ± {d['informative_fraction_std']:.3f} | "
            f"{d['final_success']:.3f} ± {d['final_success_std']:.3f} | "
            + " | ".join(f"{x:.1f}" for x in r["regret"]) + f" | {slope} |"
        )
    c = regret["cero"]
    lines += [
        "",
        f"CERO's regret grows like K^{c['loglog_slope']:.2f} (log-log fit over K = {hs[0]}..{hs[-1]}; "
        f"1 would be linear); its regret relative to the optimum falls from {c['relative'][0]:.3f} to "
        f"{c['relative'][-1]:.3f}. Uniform, DAPO and the Knapsack rule do not optimise this utility, so "
        "their regret grows linearly; DAPO's filter changes what is trained on, not what is generated, so at "
        "an equal budget it generates like uniform GRPO. MoPPS picks its batch from the whole prompt set "
        "every step, a freedom the batch-scheduled methods do not have.",
        "",
        "![allocation](allocation.png)",
        "",
        "Regenerate: the command above (`--quick` for a CI-sized run; `--out DIR` to write elsewhere).",
        "",
    ]
    text = "\n".join(lines)
    write_report(path, text)
    return text


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drift, regret = res["drift"], res["regret"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for m in METHODS:
        ks, rs = np.array(regret[m]["horizons"]), np.array(regret[m]["regret"])
        ok = rs > 0
        ax.loglog(ks[ok], rs[ok], MARKERS[m], color=COLORS[m], lw=2.5 if m == "cero" else 1.2,
                  mfc="none" if m == "dapo" else None,
                  label=f"{LABELS[m]} (slope {regret[m]['loglog_slope']:.2f})" if regret[m]["loglog_slope"]
                  else LABELS[m])
    ks = np.array(regret["cero"]["horizons"], float)
    r0 = regret["cero"]["regret"][0]
    ax.loglog(ks, r0 * np.sqrt(ks / ks[0]), "k--", lw=1, label="sqrt(K) reference")
    ax.loglog(ks, r0 * ks / ks[0], "k:", lw=1, label="K (linear) reference")
    ax.set_xlabel("epochs K (budget grows with K)")
    ax.set_ylabel("regret vs offline optimum (utility units)")
    ax.set_title("Regret, fixed policy")
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    for m in METHODS:
        d = drift[m]
        ax.plot(np.array(d["curve_spent"]) / 1e3, d["curve_success"], color=COLORS[m],
                lw=2.5 if m == "cero" else 1.2, label=LABELS[m])
    ax.set_xlabel("rollouts spent (thousands)")
    ax.set_ylabel("mean success rate")
    ax.set_title("Drifting policy: success vs rollouts")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    xs = np.arange(len(METHODS))
    vals = [drift[m]["informative_fraction"] for m in METHODS]
    errs = [drift[m]["informative_fraction_std"] for m in METHODS]
    bars = ax.bar(xs, vals, yerr=errs, color=[COLORS[m] for m in METHODS], capsize=3)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.015, f"{v:.2f}", ha="center", fontsize=9)
    ax.set_xticks(xs, [LABELS[m].replace(" ", "\n", 1) for m in METHODS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rollouts in groups with non-zero advantage")
    ax.set_title("Informative-rollout fraction (drifting policy)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Rollout allocation at an equal budget (simulated Bernoulli prompts)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    t0 = time.time()
    res = run_all(args)
    seconds = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    shown = sys.argv[1:] if argv is None else argv
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "numpy": np.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "seconds": seconds, "seeds": args.seeds, "regret_prompts": args.regret_prompts,
        "command": "python studies/simulate_allocation.py" + "".join(" " + shlex.quote(a) for a in shown),
    }
    out = {"meta": meta, **res}
    (args.out / "allocation.json").write_text(json.dumps(out, indent=1))
    text = write_markdown(res, meta, args.out / "allocation.md")
    plot(res, args.out / "allocation.png")
    print(text)
    return out


if __name__ == "__main__":
    main()
