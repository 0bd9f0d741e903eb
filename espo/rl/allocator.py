"""CERO: cross-epoch rollout allocation under one global budget.

``CeroAllocator`` decides how many rollouts each prompt of a batch gets, so that the rollout budget
``B`` of a whole RL run goes where GRPO can learn from it: to prompts whose groups are likely to be
*mixed* (some right, some wrong answers, hence a non-zero advantage) instead of prompts that the
policy always solves or always fails.

The method (CERO's, as this package reads it; choices marked *ours* are this package's)
---------------------------------------------------------------------------------------
* **Posterior.** Each prompt ``i`` keeps ``Beta(alpha_i, beta_i)`` over its success rate ``p_i``
  under the current policy, starting from ``prior`` (default ``Beta(1, 1)``). ``update`` adds the
  successes to ``alpha`` and the failures to ``beta``. Because the policy moves, an optional
  forgetting factor ``rho`` (``forgetting``) pulls all posteriors toward the prior once per epoch:
  ``alpha <- a0 + rho (alpha - a0)`` and likewise ``beta`` *(ours)*.
* **Value.** ``utility="variance"`` (default) uses the posterior expected Bernoulli variance
  ``v_i = E[p (1 - p)] = alpha beta / ((alpha + beta) (alpha + beta + 1))``: large for uncertain,
  mid-difficulty prompts, near 0 for prompts surely solved or surely failed. ``utility="mixed"``
  uses the probability that a group of ``mixed_group_size`` rollouts is mixed,
  ``1 - E[p^g] - E[(1 - p)^g]`` (the direct GRPO meaning; with the default ``g = n_max`` it gives
  hard and easy prompts more weight than the variance does, i.e. it explores more).
* **Utility** *(ours)*. The value ``w_i`` scales a concave, saturating utility of the cumulative
  allocation ``X_i`` (all rollouts given to prompt ``i`` during the run)::

      U_i(X) = w_i * k * (1 - exp(-X / k)),        U_i'(X) = w_i * exp(-X / k)

  ``k`` is ``saturation``, in rollouts. Its default is ``4 B / num_prompts``, four uniform shares
  of the whole budget: the utility is nearly linear over a prompt's fair share (the marginal value
  falls by 22% there), so the budget concentrates on informative prompts, yet a prompt's returns
  fade after a few shares, so no prompt soaks up the run. Tying ``k`` to ``B / num_prompts`` makes
  the problem scale-free (the same shape for any run length). Smaller ``k`` spreads rollouts more
  evenly; ``k -> inf`` gives all rollouts to the currently most valuable prompts.
* **Global problem.** ``maximise sum_i U_i(X_i)  s.t.  sum_i X_i <= B``. Its Fenchel-dual form has a
  price ``theta_i`` per prompt (its marginal value) and one budget multiplier ``lambda``. Given a
  price, the cumulative allocation that prompt ``i`` should reach is
  ``X_i(price) = k ln(w_i / price)^+`` (the inverse of ``U_i'``), capped at ``epochs * n_max``.
* **Online primal-dual step** (one ``allocate`` call):

  1. *Primal.* Prompt ``i`` of the batch gets rollouts iff ``theta_i > lambda``; its count is its
     per-visit target share at the current price, ``X_i(lambda) / epochs``, rounded into
     ``[n_min, n_max]`` (a GRPO group needs at least 2 rollouts; ``n_min`` defaults to 2). The sum
     of these counts is the call's *demand*.
  2. *Budget guard.* The call's spend is kept inside a corridor around the pace target
     ``b_t = remaining * len(batch) / remaining_visits`` (that is ``B / K`` per epoch when nothing
     was over- or under-spent): at most ``(1 + pace_slack) b_t`` and at least ``(1 - pace_slack) b_t``,
     never more than what is left, and never so little that the rest of the run could no longer spend
     its budget with ``n_max`` rollouts per visit. Counts are trimmed from the lowest margins
     ``theta_i / lambda`` and filled from the highest, so the corridor is met exactly up to rounding.
     The last planned call spends everything that is left (within one group).
  3. *Dual.* Both duals take an online mirror (exponentiated-gradient) step, which is a projected
     gradient step in log space and keeps them positive *(ours)*::

         theta_i <- clip(theta_i * exp(-eta_theta (x_i - X_i(theta_i) / epochs) / u), floor, w_i)
         lambda  <- lambda * exp(eta_lambda * clip((demand - b_t) / b_t, -1, 1))

     with ``u = B / planned visits`` the average rollouts per visit (so the step does not depend on
     the budget's scale). ``theta_i`` falls when prompt ``i`` got more than its target share, rises
     when it got less, and is projected onto ``[floor, U_i'(0) = w_i]``; ``lambda`` rises when the primal best response
     (before the budget guard, which is a feasibility projection) asks for more than the pace.
     Step sizes decay like ``1 / sqrt(t)`` (``eta = lr / t**lr_decay``, ``lr_decay = 0.5``;
     ``t`` counts the prompt's visits for ``theta_i`` and the calls for ``lambda``), the schedule under
     which online primal-dual methods have ``O(sqrt(K))`` regret for fixed utilities.

  ``theta`` starts at ``w_i`` under the prior (every prompt is tried on its first visit) and
  ``lambda`` at the price that would clear the budget if every prompt stayed at the prior,
  ``lambda_0 = w_0 exp(-(B / num_prompts) / k)``; so the first pass is uniform.

Defaults, and why
-----------------
``forgetting=0.8`` (evidence halves in about three epochs: a policy under RL moves, and without
forgetting a prompt failed early would be starved for good; use 1.0 for a fixed policy, the setting of
the regret guarantee), ``saturation=4 B / num_prompts`` (above), ``theta_lr=1``, ``price_lr=2``,
``lr_decay=0.5`` (the ``1/sqrt(t)`` schedule) and ``pace_slack=0.25`` (some room to move budget between
epochs, but a policy that improves makes early rollouts worth more, so the pace stays close to
``B / K``). The defaults were chosen on the simulator in ``studies/simulate_allocation.py``; all are
arguments of ``CeroAllocator``.

Epochs and batches
------------------
An *epoch* is one pass over the prompt set: ``num_prompts`` prompt visits, where every prompt id
passed to ``allocate`` is one visit. ``epochs`` (a float, so a run shorter than one pass is fine) thus
plans ``round(epochs * num_prompts)`` visits in total. Call ``allocate`` once per training step with
that step's prompts: with the whole prompt set per call, ``epochs`` is the number of calls; with
mini-batches of ``m`` prompts an epoch is ``num_prompts / m`` calls. Batches of any size work, and
prompts need not be visited equally often: the pace target is proportional to the batch size,
``remaining budget * m / remaining visits``. Forgetting is applied at the first call of each new epoch.

Budget contract
---------------
* Spend is charged when ``allocate`` returns (the counts are a commitment); ``update`` only feeds
  the posteriors and may report fewer trials than allocated.
* ``spent`` never exceeds ``total_budget``, whatever the call pattern.
* When the planned visits are used up, the budget is spent to within one group: the leftover is
  less than ``n_min`` rollouts (at most ``n_max``) provided the calls cover the planned visits.
* Calls after the planned run can only hand out what is left; they return zeros once that is less
  than one group, with a ``RuntimeWarning`` (they do not raise, so an off-by-one in a training loop
  does not crash a long run).

Determinism
-----------
Allocation has no randomness: it is a function of the state (posteriors, cumulative allocations,
duals, counters) and the batch, with stable tie-breaking by position in the batch. ``state_dict`` holds
all of it as float64/int64 tensors and Python numbers, so a run resumed from a checkpoint allocates
exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from espo.checks import check_int, is_real

__all__ = [
    "UTILITIES",
    "CeroAllocator",
]

#: Names accepted by ``CeroAllocator(utility=...)``.
UTILITIES = ("variance", "mixed")

_STATE_VERSION = 1
#: Default utility scale ``k`` in uniform shares ``B / num_prompts`` (see the module docstring).
SATURATION_SHARES = 4.0
_THETA_FLOOR = 1e-12

ArrayLike = Sequence[int] | np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Turn a Python sequence, numpy array or torch tensor (any device) into a 1-D numpy array."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (str, bytes)) or not isinstance(x, (Sequence, range)):
        raise TypeError(
            f"{name} must be a sequence of integers, a numpy array or a torch tensor, "
            f"got {type(x).__name__}; pass e.g. a list of ints"
        )
    else:
        try:
            arr = np.asarray(list(x))
        except Exception as exc:  # ragged nested lists and the like
            raise TypeError(f"{name} could not be read as a 1-D array of integers: {exc}") from None
        if arr.size == 0:
            arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}; flatten it first")
    return arr


def _to_int_array(x: Any, name: str) -> np.ndarray:
    """A 1-D int64 array from integer input; integral floats are accepted, bools and fractions not."""
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold integers, got booleans; convert them with .astype(int) if meant")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf; pass finite integer counts")
        if not np.all(arr == np.round(arr)):
            bad = arr[arr != np.round(arr)][:5].tolist()
            raise ValueError(f"{name} must hold whole numbers, got fractional values {bad}")
        return arr.astype(np.int64)
    raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")


def _check_float(value: Any, name: str, *, low: float, high: float = math.inf,
                 low_open: bool = False) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    v = float(value)
    if not math.isfinite(v) and high != math.inf:
        raise ValueError(f"{name} must be finite, got {v}")
    ok_low = v > low if low_open else v >= low
    if not ok_low or v > high or math.isnan(v):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {bound}, got {v}")
    return v


# --------------------------------------------------------------------------------------------------
# the allocator
# --------------------------------------------------------------------------------------------------
class CeroAllocator:
    """Cross-epoch rollout allocator (CERO) with one global rollout budget.

    Args:
        num_prompts: size of the prompt set; prompt ids are ``0 .. num_prompts - 1``.
        total_budget: ``B``, the rollouts the whole run may generate. Must be spendable:
            ``B <= round(epochs * num_prompts) * n_max``.
        epochs: ``K``, planned passes over the prompt set (``round(epochs * num_prompts)`` prompt
            visits in all; see the module docstring). The pace target per epoch is ``B / K``.
        n_min: smallest non-empty group (default 2: a GRPO advantage needs two rollouts).
        n_max: largest group one prompt gets in one call (default 16).
        prior: ``(a0, b0)`` of the Beta prior (default ``(1, 1)``, uniform).
        utility: ``"variance"`` (default, ``w = E[p(1-p)]``) or ``"mixed"`` (``w = P(a group of
            mixed_group_size rollouts is mixed)``); see the module docstring.
        saturation: ``k`` of ``U(X) = w k (1 - exp(-X/k))``, in rollouts. ``None`` (default) means
            ``4 * B / num_prompts`` (four uniform shares of the budget).
        forgetting: ``rho`` in ``[0, 1]``, applied once per epoch, pulls each posterior toward the prior
            (default 0.8, for a policy that improves; ``1.0`` keeps all evidence, right for a fixed
            policy and what the regret guarantee assumes).
        mixed_group_size: ``g`` of the ``"mixed"`` utility (default ``n_max``).
        theta_lr: base step of the per-prompt duals (default 1.0, on gaps in units of the average
            rollouts per visit ``B / planned visits``).
        price_lr: base step of the budget multiplier (default 2.0, on gaps relative to the pace).
        lr_decay: step sizes are ``lr / t**lr_decay`` (default 0.5, the ``1/sqrt(t)`` schedule).
        pace_slack: a call spends within ``(1 -/+ pace_slack)`` of its pace target (default 0.25),
            the room the duals have to move budget across epochs; 0 spends exactly on pace.

    Example:
        >>> alloc = CeroAllocator(num_prompts=4, total_budget=96, epochs=3)
        >>> counts = alloc.allocate([0, 1, 2, 3])          # torch.int64, 0 or in [n_min, n_max]
        >>> alloc.update([0, 1, 2, 3], successes=[0, 3, 8, 1], trials=counts)
    """

    def __init__(
        self,
        num_prompts: int,
        total_budget: int,
        epochs: float,
        *,
        n_min: int = 2,
        n_max: int = 16,
        prior: tuple[float, float] = (1.0, 1.0),
        utility: Literal["variance", "mixed"] = "variance",
        saturation: float | None = None,
        forgetting: float = 0.8,
        mixed_group_size: int | None = None,
        theta_lr: float = 1.0,
        price_lr: float = 2.0,
        lr_decay: float = 0.5,
        pace_slack: float = 0.25,
    ) -> None:
        self.num_prompts = check_int("num_prompts", num_prompts, minimum=1)
        self.total_budget = check_int("total_budget", total_budget, minimum=0)
        self.epochs = _check_float(epochs, "epochs", low=0.0, low_open=True, high=1e12)
        self.n_min = check_int("n_min", n_min, minimum=1)
        self.n_max = check_int("n_max", n_max, minimum=1)
        if self.n_max < self.n_min:
            raise ValueError(f"n_max must be >= n_min, got n_min={self.n_min}, n_max={self.n_max}")
        self.planned_visits = int(round(self.epochs * self.num_prompts))
        if self.planned_visits < 1:
            raise ValueError(
                f"epochs * num_prompts must plan at least one prompt visit, got "
                f"{self.epochs} * {self.num_prompts}; raise epochs"
            )
        if self.total_budget > self.planned_visits * self.n_max:
            raise ValueError(
                f"total_budget={self.total_budget} cannot be spent: {self.planned_visits} planned prompt "
                f"visits (epochs * num_prompts) take at most n_max={self.n_max} rollouts each, "
                f"{self.planned_visits * self.n_max} in all; lower the budget or raise epochs / n_max"
            )
        if not isinstance(prior, (tuple, list)) or len(prior) != 2:
            raise TypeError(f"prior must be a pair (a0, b0), got {prior!r}")
        a0 = _check_float(prior[0], "prior[0]", low=0.0, low_open=True, high=1e12)
        b0 = _check_float(prior[1], "prior[1]", low=0.0, low_open=True, high=1e12)
        self.prior = (a0, b0)
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
        self.utility = utility
        if saturation is None:
            self.saturation = max(SATURATION_SHARES * self.total_budget / self.num_prompts, 1.0)
        else:
            self.saturation = _check_float(saturation, "saturation", low=0.0, low_open=True, high=1e15)
        self.forgetting = _check_float(forgetting, "forgetting", low=0.0, high=1.0)
        if mixed_group_size is None:
            self.mixed_group_size = self.n_max
        else:
            self.mixed_group_size = check_int("mixed_group_size", mixed_group_size, minimum=2)
        self.theta_lr = _check_float(theta_lr, "theta_lr", low=0.0, low_open=True, high=1e6)
        self.price_lr = _check_float(price_lr, "price_lr", low=0.0, low_open=True, high=1e6)
        self.lr_decay = _check_float(lr_decay, "lr_decay", low=0.0, high=1.0)
        self.pace_slack = _check_float(pace_slack, "pace_slack", low=0.0, high=1e6)
        # cap on any prompt's cumulative target: one group of n_max per planned visit
        self._x_cap = self.epochs * self.n_max
        # the average rollouts per visit, the unit in which the theta gradient is measured
        self._unit = max(self.total_budget / self.planned_visits, 1.0)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything: posteriors at the prior, nothing spent, duals at their start values."""
        n = self.num_prompts
        a0, b0 = self.prior
        self._alpha = np.full(n, a0, dtype=np.float64)
        self._beta = np.full(n, b0, dtype=np.float64)
        self._alloc = np.zeros(n, dtype=np.int64)  # X_i, cumulative rollouts allocated
        self._visits = np.zeros(n, dtype=np.int64)  # visits of each prompt
        w0 = float(self._value(self._alpha[:1], self._beta[:1])[0])
        self._theta = np.full(n, w0, dtype=np.float64)
        self._lam = max(w0 * math.exp(-(self.total_budget / n) / self.saturation), _THETA_FLOOR)
        self._spent = 0
        self._calls = 0
        self._visits_total = 0
        self._forgot_epoch = 0

    def _config(self) -> dict[str, Any]:
        return {
            "num_prompts": self.num_prompts,
            "total_budget": self.total_budget,
            "epochs": self.epochs,
            "n_min": self.n_min,
            "n_max": self.n_max,
            "prior": list(self.prior),
            "utility": self.utility,
            "saturation": self.saturation,
            "forgetting": self.forgetting,
            "mixed_group_size": self.mixed_group_size,
            "theta_lr": self.theta_lr,
            "price_lr": self.price_lr,
            "lr_decay": self.lr_decay,
            "pace_slack": self.pace_slack,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors (CPU, float64/int64) and plain Python numbers."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "alpha": torch.from_numpy(self._alpha.copy()),
            "beta": torch.from_numpy(self._beta.copy()),
            "allocated": torch.from_numpy(self._alloc.copy()),
            "visits": torch.from_numpy(self._visits.copy()),
            "theta": torch.from_numpy(self._theta.copy()),
            "price": float(self._lam),
            "spent": int(self._spent),
            "calls": int(self._calls),
            "visits_total": int(self._visits_total),
            "forgot_epoch": int(self._forgot_epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the allocator must have been built with the same config.

        Raises ValueError (state unchanged) naming what does not match.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from CeroAllocator.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("version", "config", "alpha", "beta", "allocated", "visits", "theta",
                               "price", "spent", "calls", "visits_total", "forgot_epoch") if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}; pass the dict from CeroAllocator.state_dict()")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state version {state['version']} is not supported (expected {_STATE_VERSION})")
        cfg = state["config"]
        mine = self._config()
        if not isinstance(cfg, dict):
            raise ValueError("state['config'] must be a dict")
        diff = {k: (cfg.get(k), v) for k, v in mine.items() if _norm(cfg.get(k)) != _norm(v)}
        if diff:
            detail = ", ".join(f"{k}: state has {a!r}, allocator has {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"state comes from an allocator with another config ({detail}); build the allocator "
                f"with the config stored in state['config']"
            )
        n = self.num_prompts
        arrays = {}
        for key, dtype in (("alpha", np.float64), ("beta", np.float64), ("allocated", np.int64),
                           ("visits", np.int64), ("theta", np.float64)):
            t = state[key]
            arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if arr.shape != (n,):
                raise ValueError(f"state['{key}'] has shape {tuple(arr.shape)}, expected ({n},)")
            if dtype is np.int64 and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"state['{key}'] must be integer, got {arr.dtype}")
            arr = arr.astype(dtype, copy=True)
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"state['{key}'] must be finite and non-negative")
            arrays[key] = arr
        if np.any(arrays["alpha"] <= 0) or np.any(arrays["beta"] <= 0):
            raise ValueError("state['alpha'] and state['beta'] must be positive")
        spent = int(state["spent"])
        if not 0 <= spent <= self.total_budget:
            raise ValueError(f"state['spent']={spent} is outside [0, total_budget={self.total_budget}]")
        price = float(state["price"])
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"state['price'] must be positive and finite, got {price}")
        calls, visits_total, forgot = int(state["calls"]), int(state["visits_total"]), int(state["forgot_epoch"])
        if min(calls, visits_total, forgot) < 0:
            raise ValueError("state counters (calls, visits_total, forgot_epoch) must be non-negative")
        self._alpha, self._beta = arrays["alpha"], arrays["beta"]
        self._alloc, self._visits, self._theta = arrays["allocated"], arrays["visits"], arrays["theta"]
        self._lam, self._spent, self._calls = price, spent, calls
        self._visits_total, self._forgot_epoch = visits_total, forgot

    # ------------------------------------------------------------------ read-outs
    @property
    def spent(self) -> int:
        """Rollouts handed out so far (charged when ``allocate`` returns)."""
        return int(self._spent)

    @property
    def remaining(self) -> int:
        """``total_budget - spent``; never negative."""
        return int(self.total_budget - self._spent)

    @property
    def calls(self) -> int:
        """Number of ``allocate`` calls that allocated a non-empty batch."""
        return int(self._calls)

    @property
    def epoch(self) -> float:
        """Passes over the prompt set so far (prompt visits / num_prompts)."""
        return self._visits_total / self.num_prompts

    @property
    def price(self) -> float:
        """The budget multiplier ``lambda`` (marginal utility a rollout must beat)."""
        return float(self._lam)

    def posterior_mean(self, prompt_ids: ArrayLike, *, device: torch.device | str | None = None) -> torch.Tensor:
        """``E[p_i] = alpha / (alpha + beta)`` as float32 (a critic-free value baseline for ESPO)."""
        ids = self._ids(prompt_ids, "prompt_ids")
        mean = self._alpha[ids] / (self._alpha[ids] + self._beta[ids])
        return torch.as_tensor(mean, dtype=torch.float32).to(device if device is not None else "cpu")

    def posterior(self, prompt_ids: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """The Beta parameters ``(alpha, beta)`` of the given prompts, float64."""
        ids = self._ids(prompt_ids, "prompt_ids")
        return torch.from_numpy(self._alpha[ids].copy()), torch.from_numpy(self._beta[ids].copy())

    def value(self, prompt_ids: ArrayLike) -> torch.Tensor:
        """The utility weight ``w_i`` (``E[p(1-p)]`` or ``P(mixed group)``) of the given prompts, float64."""
        ids = self._ids(prompt_ids, "prompt_ids")
        return torch.from_numpy(self._value(self._alpha[ids], self._beta[ids]))

    def allocated(self, prompt_ids: ArrayLike) -> torch.Tensor:
        """Cumulative rollouts ``X_i`` handed to the given prompts so far, int64."""
        ids = self._ids(prompt_ids, "prompt_ids")
        return torch.from_numpy(self._alloc[ids].copy())

    # ------------------------------------------------------------------ the method
    def _value(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        s = alpha + beta
        if self.utility == "variance":
            return alpha * beta / (s * (s + 1.0))
        g = self.mixed_group_size
        ep = np.ones_like(alpha)
        eq = np.ones_like(alpha)
        for j in range(g):  # E[p^g] = prod_j (alpha + j) / (alpha + beta + j)
            ep *= (alpha + j) / (s + j)
            eq *= (beta + j) / (s + j)
        return np.clip(1.0 - ep - eq, 0.0, 1.0)

    def _target(self, w: np.ndarray, price: np.ndarray | float) -> np.ndarray:
        """Cumulative allocation at which ``U_i'(X) = price``: ``k ln(w / price)^+``, capped."""
        with np.errstate(divide="ignore"):
            x = self.saturation * np.log(np.maximum(w, 1e-300) / price)
        return np.clip(x, 0.0, self._x_cap)

    def _ids(self, prompt_ids: ArrayLike, name: str) -> np.ndarray:
        ids = _to_int_array(prompt_ids, name)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_prompts):
            bad = ids[(ids < 0) | (ids >= self.num_prompts)][:5].tolist()
            raise ValueError(
                f"{name} contains unknown prompt ids {bad}; ids must lie in [0, num_prompts={self.num_prompts})"
            )
        return ids

    def allocate(self, prompt_ids: ArrayLike) -> torch.Tensor:
        """Rollouts for each prompt of this step's batch: an int64 CPU tensor, each 0 or in [n_min, n_max].

        ``prompt_ids`` must not repeat an id. The counts are charged to the budget at once.
        """
        ids = self._ids(prompt_ids, "prompt_ids")
        m = int(ids.size)
        if m == 0:
            return torch.zeros(0, dtype=torch.int64)
        if np.unique(ids).size != m:
            vals, cnt = np.unique(ids, return_counts=True)
            raise ValueError(
                f"prompt_ids repeats ids {vals[cnt > 1][:5].tolist()}; give each prompt once per call "
                f"(its count is the size of its group)"
            )
        # -- forgetting at the first call of each new epoch
        epoch_now = self._visits_total // self.num_prompts
        if epoch_now > self._forgot_epoch:
            if self.forgetting < 1.0:
                f = self.forgetting ** (epoch_now - self._forgot_epoch)
                a0, b0 = self.prior
                self._alpha = a0 + f * (self._alpha - a0)
                self._beta = b0 + f * (self._beta - b0)
            self._forgot_epoch = epoch_now

        remaining = self.total_budget - self._spent
        rem_visits = self.planned_visits - self._visits_total
        beyond_plan = rem_visits <= 0
        n_min, n_max = self.n_min, self.n_max
        cap = m * n_max
        if rem_visits <= m:  # the last planned call (or later): spend what is left
            pace = float(remaining)
            lo = hi = min(remaining, cap)
        else:
            pace = remaining * m / rem_visits
            must = remaining - (rem_visits - m) * n_max  # else the rest of the run cannot spend it
            lo = max(0, must, math.floor((1.0 - self.pace_slack) * pace))
            hi = min(remaining, cap, max(math.ceil((1.0 + self.pace_slack) * pace), lo + n_min))
            lo = min(lo, hi)

        alpha, beta = self._alpha[ids], self._beta[ids]
        w = self._value(alpha, beta)
        theta = np.clip(self._theta[ids], _THETA_FLOOR, np.maximum(w, _THETA_FLOOR))
        lam = self._lam
        share = self._target(w, lam) / self.epochs  # per-visit target share at the current price
        eligible = theta > lam
        want = np.where(eligible, np.clip(np.rint(share), n_min, n_max), 0).astype(np.int64)
        priority = np.log(theta / lam)
        counts = _fit_to_range(want, priority, lo, hi, n_min, n_max)
        spend = int(counts.sum())
        assert spend <= remaining

        # -- dual steps (skipped past the plan: there is no pace left to track)
        visits = self._visits[ids]
        if not beyond_plan:
            eta_t = self.theta_lr / (visits + 1.0) ** self.lr_decay
            gap = (counts - self._target(w, theta) / self.epochs) / self._unit
            self._theta[ids] = np.clip(theta * np.exp(-eta_t * gap), _THETA_FLOOR, np.maximum(w, _THETA_FLOOR))
            if pace > 0:
                demand = int(want.sum())
                rel = float(np.clip((demand - pace) / pace, -1.0, 1.0))
                eta_l = self.price_lr / (self._calls + 1.0) ** self.lr_decay
                self._lam = max(lam * math.exp(eta_l * rel), _THETA_FLOOR)
        self._alloc[ids] += counts
        self._visits[ids] = visits + 1
        self._visits_total += m
        self._spent += spend
        self._calls += 1
        if beyond_plan and spend == 0:
            warnings.warn(
                f"CeroAllocator.allocate() called after the planned {self.planned_visits} prompt visits "
                f"(epochs={self.epochs}); {remaining} rollouts are left, less than one group, so every "
                f"count is 0. Raise epochs when building the allocator to plan a longer run.",
                RuntimeWarning,
                stacklevel=2,
            )
        return torch.from_numpy(counts)

    def update(self, prompt_ids: ArrayLike, successes: ArrayLike, trials: ArrayLike) -> None:
        """Add observed outcomes: ``alpha += successes``, ``beta += trials - successes``.

        Ids may repeat (outcomes are summed). ``trials`` need not equal the allocated counts.
        Raises (state unchanged) on unknown ids, mismatched lengths, negative counts or
        ``successes > trials``.
        """
        ids = self._ids(prompt_ids, "prompt_ids")
        s = _to_int_array(successes, "successes")
        n = _to_int_array(trials, "trials")
        if s.shape != ids.shape or n.shape != ids.shape:
            raise ValueError(
                f"prompt_ids, successes and trials must have the same length, got "
                f"{ids.size}, {s.size} and {n.size}"
            )
        if np.any(s < 0) or np.any(n < 0):
            which = "successes" if np.any(s < 0) else "trials"
            raise ValueError(f"{which} must be non-negative, got {(s if which == 'successes' else n).min()}")
        if np.any(s > n):
            i = int(np.argmax(s > n))
            raise ValueError(
                f"successes must not exceed trials, got successes={int(s[i])} > trials={int(n[i])} "
                f"for prompt {int(ids[i])}"
            )
        np.add.at(self._alpha, ids, s.astype(np.float64))
        np.add.at(self._beta, ids, (n - s).astype(np.float64))

    def __repr__(self) -> str:
        return (
            f"CeroAllocator(num_prompts={self.num_prompts}, total_budget={self.total_budget}, "
            f"epochs={self.epochs}, n_min={self.n_min}, n_max={self.n_max}, utility={self.utility!r}, "
            f"spent={self._spent})"
        )


def _norm(v: Any) -> Any:
    """Config values compared after JSON-like normalisation (tuples == lists, ints == floats)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if is_real(v):
        return float(v)
    return v


def _fit_to_range(want: np.ndarray, priority: np.ndarray, lo: int, hi: int, n_min: int, n_max: int) -> np.ndarray:
    """Adjust group sizes so their sum lies in ``[lo, hi]`` (hi is hard; lo up to < n_min short).

    Each entry stays 0 or in ``[n_min, n_max]``. Surplus is taken from the lowest priorities (groups
    shrink to ``n_min`` first, then close); a shortfall is filled from the highest priorities (open
    groups grow first, then new groups open). Ties break by position, so the result is deterministic.
    """
    counts = want.astype(np.int64).copy()
    total = int(counts.sum())
    if lo <= total <= hi:
        return counts
    asc = np.argsort(priority, kind="stable")
    if total > hi:
        for i in asc:  # shrink open groups toward n_min
            if total <= hi:
                break
            c = counts[i]
            if c > n_min:
                cut = min(c - n_min, total - hi)
                counts[i] = c - cut
                total -= cut
        for i in asc:  # close groups
            if total <= hi:
                break
            if counts[i] > 0:
                total -= int(counts[i])
                counts[i] = 0
    if total < lo:
        desc = asc[::-1]
        for i in desc:  # grow open groups
            if total >= lo:
                break
            c = counts[i]
            if 0 < c < n_max:
                add = min(n_max - c, lo - total)
                counts[i] = c + add
                total += add
        for i in desc:  # open new groups
            if total >= lo:
                break
            if counts[i] == 0 and hi - total >= n_min:
                c = min(n_max, max(n_min, lo - total), hi - total)
                counts[i] = c
                total += c
    return counts
