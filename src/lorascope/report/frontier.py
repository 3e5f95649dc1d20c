"""Forgetting at equal learning: a monotone forgetting-vs-learning curve per method, compared where both reach.

Each method's points (learning L, forgetting F) over learning rates, budgets and seeds are fitted by isotonic
regression (F non-decreasing in L: learning more never forgets less along a method's frontier), and the two
fitted curves, interpolated linearly between fitted points, are compared on a grid of L inside the range BOTH
methods reach. The statistic is the mean of F_a(L) - F_b(L) over that grid (negative: a forgets less at equal
learning). Outside the common range there is no comparison; without one the answer is "not comparable".

Example::

    >>> a = [(0.1, 0.01), (0.2, 0.02), (0.3, 0.03)]; b = [(0.1, 0.03), (0.2, 0.04), (0.4, 0.06)]
    >>> round(matched_difference(a, b), 4), common_range(a, b)
    (-0.02, (0.1, 0.3))
"""

from __future__ import annotations

import numpy as np

GRID = 25  # points of the common learning range where the curves are compared


def isotonic(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Non-decreasing least-squares fit to y (in the given order): pool-adjacent-violators.

    Written here in numpy because scipy and scikit-learn are not dependencies of the torch-free report.
    """
    y = np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y, w):
        vals.append(yi), wts.append(wi), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:  # a violation: pool the last two blocks
            v2, w2, n2 = vals.pop(), wts.pop(), sizes.pop()
            wsum = wts[-1] + w2
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / wsum
            wts[-1], sizes[-1] = wsum, sizes[-1] + n2
    return np.repeat(vals, sizes)


def fit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The monotone curve through a method's (L, F) points: (L, fitted F) sorted by L, ties of L pooled."""
    pts = sorted((float(x), float(y)) for x, y in points)
    xs = np.array([p[0] for p in pts])
    fy = isotonic(np.array([p[1] for p in pts]))
    out: dict[float, list[float]] = {}
    for x, y in zip(xs, fy):
        out.setdefault(x, []).append(y)
    return [(float(x), float(np.mean(v))) for x, v in out.items()]


def common_range(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[float, float] | None:
    """[max of the minima, min of the maxima] of learning, or None when the two ranges do not overlap."""
    if not a or not b:
        return None
    lo = max(min(x for x, _ in a), min(x for x, _ in b))
    hi = min(max(x for x, _ in a), max(x for x, _ in b))
    return (lo, hi) if hi > lo else None


def matched_difference(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Mean over the common learning range of F_a - F_b (fitted curves); NaN when there is no common range."""
    rng = common_range(a, b)
    if rng is None:
        return float("nan")
    grid = np.linspace(rng[0], rng[1], GRID)
    ca, cb = fit(a), fit(b)
    fa = np.interp(grid, [x for x, _ in ca], [y for _, y in ca])
    fb = np.interp(grid, [x for x, _ in cb], [y for _, y in cb])
    return float(np.mean(fa - fb))


def matched_boot(la: np.ndarray, fa: np.ndarray, lb: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """matched_difference on every bootstrap replicate (the curves refitted each time).

    la, fa: (B, n_a) learning and forgetting of a's points per replicate; lb, fb likewise for b.
    """
    return np.array([matched_difference(list(zip(la[k], fa[k])), list(zip(lb[k], fb[k])))
                     for k in range(la.shape[0])])
