"""Alpha spending over repeated looks at one study (Lan & DeMets 1983, O'Brien-Fleming-type spending function).

A study that is extended after its verdicts were read, and read again, tests the same questions several times;
each look may spend only part of the error rate, so that over all looks the chance of a false "yes" stays at
alpha. The O'Brien-Fleming-type function spends almost nothing early and most at the last look:

    alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)),   t = k / K for look k of at most K (equally spaced)

    >>> [round(z, 2) for z in boundaries(0.05, 3)]   # two-sided z boundaries of looks 1..3
    [3.71, 2.51, 1.99]

The boundaries come from the joint law of the looks' z statistics (a Brownian motion in information time),
integrated on a grid look after look (Armitage, McPherson & Rowe 1969), numpy only. `nominal_alpha` is the
two-sided level a test at look k uses (with Holm's correction over the comparisons inside it).
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np

_N = NormalDist()
GRID = 1201


def spent(t: float, alpha: float) -> float:
    """Cumulative alpha spent by information fraction t (0 < t <= 1)."""
    return 2 - 2 * _N.cdf(_N.inv_cdf(1 - alpha / 2) / math.sqrt(t))


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _sf(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in np.ravel(x)]).reshape(np.shape(x))


@lru_cache(maxsize=16)
def boundaries(alpha: float, looks: int) -> tuple[float, ...]:
    """Two-sided z boundaries of looks 1..looks, equally spaced in information."""
    ts = [k / looks for k in range(1, looks + 1)]
    c = [_N.inv_cdf(1 - spent(ts[0], alpha) / 2)]
    s = np.linspace(-c[0] * math.sqrt(ts[0]), c[0] * math.sqrt(ts[0]), GRID)
    f = _phi(s / math.sqrt(ts[0])) / math.sqrt(ts[0])  # density of S_1 = Z_1 sqrt(t_1) where no boundary was crossed
    for k in range(1, looks):
        dt, w = ts[k] - ts[k - 1], _weights(s)
        target = spent(ts[k], alpha) - spent(ts[k - 1], alpha)

        def cross(ck: float, s=s, f=f, w=w, dt=dt, tk=ts[k]) -> float:
            b = ck * math.sqrt(tk)
            p = _sf((b - s) / math.sqrt(dt)) + _sf((b + s) / math.sqrt(dt))
            return float(np.sum(w * f * p))

        lo, hi = 0.0, 10.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cross(mid) > target else (lo, mid)
        c.append((lo + hi) / 2)
        new = np.linspace(-c[-1] * math.sqrt(ts[k]), c[-1] * math.sqrt(ts[k]), GRID)
        f = (_phi((new[:, None] - s[None, :]) / math.sqrt(dt)) / math.sqrt(dt)) @ (w * f)
        s = new
    return tuple(c)


def _weights(s: np.ndarray) -> np.ndarray:
    w = np.full(len(s), s[1] - s[0])
    w[0] = w[-1] = (s[1] - s[0]) / 2
    return w


def nominal_alpha(look: int, looks: int, alpha: float) -> float:
    """The two-sided level of the tests at `look` (1-based) so that all `looks` together keep alpha."""
    z = boundaries(alpha, looks)[look - 1]
    return 2 * (1 - _N.cdf(z))
