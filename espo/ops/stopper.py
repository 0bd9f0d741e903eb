"""ESPO's early-stopping rule: its configuration and the per-row state that ``espo.sample`` updates.

Per decoding step, per live row (see ``espo.ops.reference.stop_update_reference`` for the exact arithmetic):

    g~ = clip((g - mean) / sqrt(var + delta), -clip, clip)       mean, var frozen for the whole batch
    z  = alpha_s * z + (1 - alpha_s) * g~
    stop = armed and ready and t >= min_tokens and z > beta * max(value, value_floor)        (regret_rule)
    stop = armed and t >= min_tokens and value < value_stop                                   (value_rule)

The value rule (ours, ARRoL-style: stop once the critic gives up on the rollout) reads only the critic's value, not
the logits; studies/results/stop-rules.md compares both rules, and others, against length-aware controls.

At each batch boundary (``end_batch``) the token statistics and the threshold move:

    mean <- alpha_ema * mean + (1 - alpha_ema) * mean(g over the batch's tokens)   (set on the first batch)
    var  <- alpha_ema * var  + (1 - alpha_ema) * var(g over the batch's tokens)    (population variance)
    beta <- clip(beta + eta_beta * (stop_rate - target_rate), beta_min, beta_max)  (only while armed)
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from espo.checks import check_device, check_fields, check_int, setting

_ROW_FIELDS = {
    "z": torch.float32,
    "sum_g": torch.float32,
    "sum_g2": torch.float32,
    "count": torch.int32,
    "position": torch.int32,
    "stopped": torch.bool,
}
_BATCH_FIELDS = ("tokens", "sum_g", "sum_g2", "sequences", "stopped")
SCALARS = ("mean", "var", "beta", "armed", "ready")  # the slots of EarlyStopper.scalars, in order
_SLOT = {name: i for i, name in enumerate(SCALARS)}


class StopState(NamedTuple):
    """The stop state one ``espo.sample`` call reads and updates: what every backend takes (the CUDA kernel's
    ``StopState`` in csrc/sample.cuh holds the same fields).

    z, sum_g, sum_g2 (float32), count, position (int32), stopped (bool): the per-row tensors [num_rows],
        updated in place.
    scalars: float32 [5], the ``SCALARS`` (mean, var, beta, armed, ready), read only.
    rows: int64 [B], the stopper row each logits row updates, or None for row i -> stopper row i.
    values: float32 [B], critic values for the threshold, or None for the value floor.
    alpha_s, clip, delta, value_floor, min_tokens: the rule's constants (``ESPOConfig``).
    """

    z: torch.Tensor
    sum_g: torch.Tensor
    sum_g2: torch.Tensor
    count: torch.Tensor
    position: torch.Tensor
    stopped: torch.Tensor
    scalars: torch.Tensor
    rows: torch.Tensor | None
    values: torch.Tensor | None
    alpha_s: float
    clip: float
    delta: float
    value_floor: float
    min_tokens: int


@dataclass(frozen=True)
class ESPOConfig:
    """Hyper-parameters of the ESPO stop rule: the paper's defaults, but for the fields marked (ours).

    Each field's help line is in its metadata (``espo train --help`` shows it as ``--espo-NAME``).
    """

    alpha_ema: float = setting(0.99, "EMA factor of the frozen token statistics (mean, var) across batches",
                               minimum=0.0, maximum=1.0)
    alpha_s: float = setting(0.9, "smoothing factor of the per-sequence regret signal z", minimum=0.0, maximum=1.0)
    beta: float = setting(7.0, "initial stop threshold multiplier")
    eta_beta: float = setting(0.1, "step of the threshold controller toward target_rate", minimum=0.0)
    target_rate: float = setting(0.25, "share of sequences the controller aims to stop per batch", minimum=0.0,
                                 maximum=1.0)
    value_floor: float = setting(0.2, "lower bound on the critic value in the threshold (eps in the paper)",
                                 minimum=0.0)
    clip: float = setting(10.0, "bound on the normalised regret; a stop needs clip > beta * max(V, value_floor), "
                                "so 10 lets the paper's beta 7 fire at any V <= 1 (ours; 3 before, where it could not)",
                          above=0.0)
    delta: float = setting(1e-6, "added to var before the square root (ours)", above=0.0)
    beta_min: float = setting(0.5, "lower bound of the threshold multiplier (ours)", minimum=0.0)
    beta_max: float = setting(50.0, "upper bound of the threshold multiplier (ours)")
    min_tokens: int = setting(0, "a row may stop only at a token index t >= min_tokens, 0-based (ours)", minimum=0)
    r_fail: float = setting(-1.0, "terminal reward of the token that triggered a stop")
    regret_rule: bool = setting(True, "stop on the smoothed regret z (ESPO's rule); off leaves the value rule alone "
                                      "(ours)")
    value_rule: bool = setting(False, "stop a rollout once its critic value V_t falls below value_stop, from "
                                      "token min_tokens on; needs a per-token value, e.g. a head from `espo value "
                                      "fit` (ours)")
    value_stop: float = setting(0.05, "the value under which value_rule stops a rollout (ours)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not (self.regret_rule or self.value_rule):
            raise ValueError("ESPOConfig needs regret_rule or value_rule (or both): with neither nothing can stop")
        if not self.beta_min <= self.beta <= self.beta_max:
            raise ValueError(
                f"ESPOConfig needs beta_min <= beta <= beta_max, got {self.beta_min} <= {self.beta} <= {self.beta_max}"
            )
        reason = self.never_fires()
        if reason is not None:
            warnings.warn(reason, stacklevel=3)

    def stoppable_below(self, beta: float | None = None) -> float:
        """The value under which a row can stop at multiplier ``beta`` (default: the initial one): z never
        reaches ``clip`` (it averages clipped values), so a stop needs ``clip > beta * max(V, value_floor)``."""
        return self.clip / (self.beta if beta is None else beta)

    def never_fires(self) -> str | None:
        """Why this rule can never stop anything, whatever the values; None when it can."""
        if self.value_rule:
            return None
        name = "beta" if self.eta_beta == 0 else "beta_min"  # the controller may lower beta to beta_min
        lowest = getattr(self, name)
        if self.clip > lowest * self.value_floor:
            return None
        return (f"this ESPO setting can never stop a rollout: z stays below clip={self.clip}, and a stop needs "
                f"z > beta * max(V, value_floor) >= {name} * value_floor = {lowest * self.value_floor:g}; raise clip "
                f"or lower {name}")


@dataclass
class CriticWarmup:
    """ESPO's arming rule: stop only once the critic has converged.

    Armed when the critic loss stays below ``loss_threshold`` for ``patience`` consecutive updates, or
    changes by less than ``min_change`` between two consecutive updates; forced on once
    ``force_fraction`` of the ``total_steps`` planned training steps have passed. Once armed, it stays
    armed. Call ``update`` after each critic update and ``stopper.arm()`` when it returns True.
    """

    total_steps: int
    loss_threshold: float = 0.5
    patience: int = 3
    min_change: float = 0.1
    force_fraction: float = 0.1
    armed: bool = False
    below: int = 0
    last_loss: float | None = None

    def update(self, critic_loss: float, step: int) -> bool:
        """Record the critic loss of training step ``step`` (0-based); return whether stopping is on."""
        if not self.armed:
            self.below = self.below + 1 if critic_loss < self.loss_threshold else 0
            settled = self.last_loss is not None and abs(critic_loss - self.last_loss) < self.min_change
            forced = step + 1 >= self.force_fraction * self.total_steps
            self.armed = self.below >= self.patience or settled or forced
            self.last_loss = critic_loss
        return self.armed


class EarlyStopper:
    """Per-row ESPO stop state for a batch of ``batch_size`` decoding rows on ``device``.

    Pass it to ``espo.sample(..., stopper=...)``: each call updates every row from the regret the
    sampler computed and returns ``stop``. A stopped row stays stopped (its later steps count for
    nothing) until ``reset_rows`` starts a new sequence there. Nothing stops before ``arm()`` is called
    and before the first ``end_batch()`` has set the token statistics.

    Per-row tensors (length ``batch_size``): ``z``, ``sum_g``, ``sum_g2``, ``count`` (tokens counted),
    ``position`` (steps taken since the row's reset; the token index t of the rule), ``stopped``.
    """

    def __init__(self, config: ESPOConfig | None = None, batch_size: int = 1, device: torch.device | str = "cpu"):
        if config is not None and not isinstance(config, ESPOConfig):
            raise TypeError(f"EarlyStopper config must be an espo.ESPOConfig (e.g. ESPOConfig(beta=1.0)) or None, "
                            f"got {type(config).__name__}")
        batch_size = check_int("EarlyStopper batch_size", batch_size, minimum=1)
        device = check_device("EarlyStopper device", device)
        self.config = config if config is not None else ESPOConfig()
        self.batch_size = batch_size
        # The per-row fields are the rows of one tensor per dtype ([3, B] float32, [2, B] int32, [1, B] bool), so that
        # clearing rows (each admission of a decoder) is one masked fill per dtype, not per field.
        dtypes = list(dict.fromkeys(_ROW_FIELDS.values()))
        self._packed = [torch.zeros((list(_ROW_FIELDS.values()).count(dt), batch_size), dtype=dt, device=device)
                        for dt in dtypes]
        views = {dt: iter(packed.unbind(0)) for dt, packed in zip(dtypes, self._packed)}
        self.rows = {k: next(views[dt]) for k, dt in _ROW_FIELDS.items()}
        self._saved: list[torch.Tensor] | None = None  # save_rows' copy of _packed
        self.device = self.rows["z"].device  # with its index: "cuda" becomes "cuda:0", as tensors report it
        # mean, var, beta, armed, ready: one device vector so that kernels read it without a host sync. Without the
        # regret rule beta is +inf: the kernels' test z > beta * max(V, floor) then never holds.
        beta = self.config.beta if self.config.regret_rule else float("inf")
        self.scalars = torch.tensor([0.0, 1.0, beta, 0.0, 0.0], dtype=torch.float32, device=self.device)
        self._batch = torch.zeros(len(_BATCH_FIELDS), dtype=torch.float64, device=self.device)
        self.batches_seen = 0

    def __getattr__(self, name: str) -> torch.Tensor:
        rows = self.__dict__.get("rows")
        if rows is not None and name in rows:
            return rows[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def mean(self) -> float:
        return float(self.scalars[_SLOT["mean"]])

    @property
    def var(self) -> float:
        return float(self.scalars[_SLOT["var"]])

    @property
    def beta(self) -> float:
        return float(self.scalars[_SLOT["beta"]])

    @property
    def armed(self) -> bool:
        return bool(self.scalars[_SLOT["armed"]] > 0)

    @property
    def ready(self) -> bool:
        """Whether the token statistics exist (after the first ``end_batch``)."""
        return bool(self.scalars[_SLOT["ready"]] > 0)

    def state(self, rows: torch.Tensor | None = None, values: torch.Tensor | None = None) -> StopState:
        """The ``StopState`` of one sampling call: logits row i updates stopper row ``rows[i]`` (row i when None),
        with critic ``values`` [B] (the value floor when None)."""
        r, cfg = self.rows, self.config
        return StopState(
            r["z"], r["sum_g"], r["sum_g2"], r["count"], r["position"], r["stopped"], self.scalars, rows, values,
            float(cfg.alpha_s), float(cfg.clip), float(cfg.delta), float(cfg.value_floor), int(cfg.min_tokens),
        )

    def set_statistics(self, mean: float, var: float, beta: float | None = None) -> None:
        """Set the frozen token statistics (and the threshold multiplier), e.g. from a trainer's stopper; the
        stopper is ready from then on."""
        self.scalars[_SLOT["mean"]], self.scalars[_SLOT["var"]] = float(mean), float(var)
        if beta is not None and self.config.regret_rule:
            self.scalars[_SLOT["beta"]] = float(beta)
        self.scalars[_SLOT["ready"]] = 1.0

    def arm(self, armed: bool = True) -> None:
        """Allow (or forbid) stopping, e.g. once the critic has warmed up."""
        self.scalars[_SLOT["armed"]] = float(armed)

    def live(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Which of ``rows`` (all when None) are not stopped, before a sampling call; None without the value rule."""
        if not self.config.value_rule:
            return None
        stopped = self.rows["stopped"] if rows is None else self.rows["stopped"][rows]
        return ~stopped

    def apply_value_rule(self, stop: torch.Tensor, live: torch.Tensor, valid: torch.Tensor,
                         rows: torch.Tensor | None, values: torch.Tensor | None) -> torch.Tensor:
        """After a sampling call, stop the rows whose critic value is below ``value_stop`` (the value rule); ``live``
        is ``self.live(rows)`` taken before the call. Returns the stop mask with those rows added."""
        if values is None:  # no critic value: the value rule has nothing to read
            return stop
        cfg, r = self.config, (slice(None) if rows is None else rows)
        token_index = self.rows["position"][r] - 1  # the call advanced every live row's position past its token
        fire = (live & valid & (token_index >= cfg.min_tokens) & (values < cfg.value_stop)
                & (self.scalars[_SLOT["armed"]] > 0))
        self.rows["stopped"][r] = self.rows["stopped"][r] | fire
        return stop | fire

    def _fold(self, mask: torch.Tensor) -> None:
        """Add the masked rows' sequences to this batch's totals (``_BATCH_FIELDS``, summed in float64) and clear those
        rows: a decoder does this at every admission, between two steps, so it is a few launches, not one a field."""
        r = self.rows
        seq = mask & ((r["count"] > 0) | r["stopped"])
        sequences = torch.stack((seq, seq & r["stopped"])).sum(1, dtype=torch.float64)
        tokens = (r["count"] * mask).sum(0, keepdim=True, dtype=torch.float64)
        sums = (self._packed[0][1:] * mask).sum(1, dtype=torch.float64)  # the float32 rows after z: sum_g, sum_g2
        self._batch += torch.cat((tokens, sums, sequences))
        for packed in self._packed:
            packed.masked_fill_(mask, 0)

    def reset_rows(self, mask: torch.Tensor) -> None:
        """Start new sequences in the rows where ``mask`` (bool [batch_size]) is True.

        The finished sequences there are kept in this batch's statistics for ``end_batch``.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (self.batch_size,):
            raise ValueError(f"reset_rows expects a bool tensor of shape ({self.batch_size},), got {mask!r}")
        self._fold(mask.to(self.device))

    def save_rows(self) -> None:
        """Keep a copy of every row's state, for ``restore_rows`` (no host sync).

        For a caller that updates rows before it knows whether they should have been: a decoder that launches a
        step before reading the previous step's finish codes saves the rows first, then restores those whose
        rollouts turn out to have ended already."""
        if self._saved is None:
            self._saved = [torch.empty_like(packed) for packed in self._packed]
        torch._foreach_copy_(self._saved, self._packed)  # one launch on a GPU (what optimizers use), not one a dtype

    def restore_rows(self, rows: torch.Tensor) -> None:
        """Put the rows ``rows`` (int64 indices on the stopper's device) back as the last ``save_rows`` kept them."""
        if self._saved is None:
            raise RuntimeError("EarlyStopper.restore_rows needs a save_rows() first")
        for saved, packed in zip(self._saved, self._packed):
            packed[:, rows] = saved[:, rows]

    def end_batch(self, all_reduce: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
        """Apply the batch-boundary update from every sequence of the batch, then reset all rows.

        ``all_reduce`` sums the batch totals across processes in place (e.g. ``torch.distributed.all_reduce``)
        so that data-parallel ranks, each decoding its share of the batch, keep identical statistics.
        Returns the batch's token mean and variance of g, its stop rate and the new beta.
        """
        self._fold(torch.ones(self.batch_size, dtype=torch.bool, device=self.device))
        if all_reduce is not None:
            all_reduce(self._batch)
        tokens, sum_g, sum_g2, sequences, stopped = self._batch.tolist()
        self._batch.zero_()
        cfg, s = self.config, self.scalars
        report = {"tokens": tokens, "sequences": sequences, "stop_rate": stopped / sequences if sequences else 0.0}
        if tokens > 0:
            batch_mean = sum_g / tokens
            batch_var = max(sum_g2 / tokens - batch_mean * batch_mean, 0.0)
            report.update(batch_mean=batch_mean, batch_var=batch_var)
            a = cfg.alpha_ema if self.ready else 0.0  # the first batch sets the statistics outright
            s[_SLOT["mean"]] = a * float(s[_SLOT["mean"]]) + (1 - a) * batch_mean
            s[_SLOT["var"]] = a * float(s[_SLOT["var"]]) + (1 - a) * batch_var
            s[_SLOT["ready"]] = 1.0
            if self.armed and sequences and cfg.regret_rule:
                beta = float(s[_SLOT["beta"]]) + cfg.eta_beta * (report["stop_rate"] - cfg.target_rate)
                s[_SLOT["beta"]] = min(max(beta, cfg.beta_min), cfg.beta_max)
        self.batches_seen += 1
        report.update(mean=self.mean, var=self.var, beta=self.beta)
        return report

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "batch_size": self.batch_size,
            "rows": {k: v.detach().cpu().clone() for k, v in self.rows.items()},
            "scalars": self.scalars.detach().cpu().clone(),
            "batch": self._batch.detach().cpu().clone(),
            "batches_seen": self.batches_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict``; the config and batch size must match this stopper's."""
        self._check_state(state)
        saved = state.get("config")
        if isinstance(saved, dict):  # a stopper saved before a field existed has that field's default
            saved = {**{f.name: f.default for f in dataclasses.fields(ESPOConfig) if f.name not in saved}, **saved}
        if saved != dataclasses.asdict(self.config):
            raise ValueError(
                "EarlyStopper.load_state_dict: the saved config differs from this stopper's "
                f"({saved} != {dataclasses.asdict(self.config)}); build the stopper with the saved config"
            )
        if state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"EarlyStopper.load_state_dict: saved batch_size {state.get('batch_size')} != {self.batch_size}"
            )
        self._check_shapes(state)  # before anything is copied
        for k, v in state["rows"].items():
            self.rows[k].copy_(v)
        self.scalars.copy_(state["scalars"])
        self._batch.copy_(state["batch"])
        self.batches_seen = int(state["batches_seen"])

    @staticmethod
    def _check_state(state: Any) -> None:
        """Refuse a ``state`` that is not a dict with every entry of ``state_dict``'s."""
        where = "EarlyStopper.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where} needs the dict that state_dict() returns, got {type(state).__name__}")
        missing = [k for k in ("config", "batch_size", "rows", "scalars", "batch", "batches_seen") if k not in state]
        if missing:
            raise ValueError(f"{where}: the state lacks {', '.join(missing)}; pass what state_dict() returned")

    def _check_shapes(self, state: dict[str, Any]) -> None:
        """Refuse a state whose tensors are not those of a stopper of this batch size."""
        where = "EarlyStopper.load_state_dict"
        rows = state["rows"]
        if not isinstance(rows, dict) or set(rows) != set(_ROW_FIELDS):
            got = sorted(rows) if isinstance(rows, dict) else type(rows).__name__
            raise ValueError(f"{where}: state['rows'] must hold the tensors {', '.join(_ROW_FIELDS)}; got {got}")
        shapes = {**{f"rows['{k}']": (rows[k], (self.batch_size,)) for k in _ROW_FIELDS},
                  "scalars": (state["scalars"], (len(SCALARS),)), "batch": (state["batch"], (len(_BATCH_FIELDS),))}
        for name, (value, shape) in shapes.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{where}: state {name} must be a tensor of shape {shape}, got {got}")
