"""Plain, slow transcriptions used to check the references themselves (no shared code with espo)."""
import math

import numpy as np


def kept_set(x: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Boolean mask of the tokens top-k then top-p keep, computed in float64 from the definitions."""
    V = x.size
    keep = np.ones(V, dtype=bool)
    if 0 < top_k < V:
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        logit = np.where(keep, x.astype(np.float64) / temperature, -np.inf)
        p = np.exp(logit - logit.max())
        p /= p.sum()
        order = np.argsort(-x, kind="stable")
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p - 1e-12))  # first index with cum >= top_p
        keep &= x >= x[order[min(n, V - 1)]]
    return keep


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic over the categories of positive probability."""
    n = counts.sum()
    m = probs > 0
    expected = n * probs[m]
    return float(((counts[m] - expected) ** 2 / expected).sum())


def chi_square_bound(categories: int) -> float:
    """About a 1e-6 false-alarm bound for a chi-square with categories - 1 degrees of freedom."""
    df = categories - 1
    return df + 7.0 * math.sqrt(2.0 * df) + 10.0


class SpecStopper:
    """espo-method.md's stop rule written out with Python floats, one sequence per row."""

    def __init__(self, cfg, rows: int):
        self.cfg = cfg
        self.mean, self.var, self.beta, self.ready, self.armed = 0.0, 1.0, cfg.beta, False, False
        self.z = [0.0] * rows
        self.t = [0] * rows
        self.stopped = [False] * rows
        self.batch_g: list[float] = []
        self.sequences = 0
        self.stops = 0
        self.live = [False] * rows

    def step(self, regrets, values=None):
        c = self.cfg
        out = []
        for b, g in enumerate(regrets):
            if self.stopped[b]:
                out.append(True)
                continue
            self.live[b] = True
            gn = min(max((g - self.mean) / math.sqrt(self.var + c.delta), -c.clip), c.clip)
            self.z[b] = c.alpha_s * self.z[b] + (1 - c.alpha_s) * gn
            v = c.value_floor if values is None else values[b]
            stop = (self.armed and self.ready and self.t[b] >= c.min_tokens
                    and self.z[b] > self.beta * max(v, c.value_floor))
            self.t[b] += 1
            self.batch_g.append(g)
            self.stopped[b] = stop
            out.append(stop)
        return out

    def reset(self, b):
        self.sequences += self.live[b]
        self.stops += self.stopped[b]
        self.z[b], self.t[b], self.stopped[b], self.live[b] = 0.0, 0, False, False

    def end_batch(self):
        for b in range(len(self.z)):
            self.reset(b)
        c, g = self.cfg, np.array(self.batch_g, dtype=np.float64)
        if g.size:
            a = c.alpha_ema if self.ready else 0.0
            self.mean = a * self.mean + (1 - a) * g.mean()
            self.var = a * self.var + (1 - a) * g.var()
            self.ready = True
            if self.armed and self.sequences:
                rate = self.stops / self.sequences
                self.beta = min(max(self.beta + c.eta_beta * (rate - c.target_rate), c.beta_min), c.beta_max)
        self.batch_g, self.sequences, self.stops = [], 0, 0
