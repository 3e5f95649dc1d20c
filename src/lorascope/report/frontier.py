"""Forgetting at equal learning: each method's lower-left frontier of forgetting vs learning, compared where both
reach.

Each method's points (learning L, forgetting F) over learning rates, budgets and seeds are reduced to its Pareto
frontier: the points no other point of the method beats on both counts (learned at least as much AND forgot no
more). Read left to right the frontier's forgetting only rises, and at a learning level L it is the least
forgetting the method reached while learning about L or more (linear between frontier points; left of the first
one, the method's least forgetting). The two frontiers are compared on a grid of L inside the range BOTH methods
reach; the statistic is the mean of F_a(L) - F_b(L) over that grid (negative: a forgets less at equal learning).
Outside the common range there is no comparison; without one the answer is "not comparable".

Why the frontier and not a monotone regression through every point (isotonic): a regression averages the
dominated points in, so a method is penalised for each bad learning rate its grid happened to try (a diverging
LR sits at low learning and high forgetting and drags the whole left of the curve up). The frontier asks the
paper's question: at this much learning, how little forgetting can the method get. Its own bias runs the other
way (the minimum over more noisy points is lower), which is why the bootstrap refits it on every replicate.

Example::

    >>> a = [(0.1, 0.01), (0.2, 0.02), (0.3, 0.03)]; b = [(0.1, 0.03), (0.2, 0.04), (0.4, 0.06)]
    >>> round(matched_difference(a, b), 4), common_range(a, b)
    (-0.02, (0.1, 0.3))
    >>> fit([(0.1, 0.01), (0.3, 0.03), (-0.2, 0.3)])  # the bad LR (-0.2, 0.3) is dominated: not on the frontier
    [(0.1, 0.01), (0.3, 0.03)]
"""

from __future__ import annotations

import numpy as np

GRID = 25  # points of the common learning range where the curves are compared


def pareto_front(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points when both coordinates are 'higher is better', sorted by the first."""
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)]
    return sorted(set(front))


def fit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A method's lower-left frontier: (L, F) of its points that no other point beats on both, sorted by L."""
    return [(x, -y) for x, y in pareto_front([(float(x), -float(y)) for x, y in points])]


def common_range(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[float, float] | None:
    """[max of the minima, min of the maxima] of learning, or None when the two ranges do not overlap."""
    if not a or not b:
        return None
    lo = max(min(x for x, _ in a), min(x for x, _ in b))
    hi = min(max(x for x, _ in a), max(x for x, _ in b))
    return (lo, hi) if hi > lo else None


def level(points: list[tuple[float, float]], at: np.ndarray | float) -> np.ndarray:
    """The frontier's forgetting at learning level(s) `at` (linear between frontier points, flat past its ends)."""
    c = fit(points)
    return np.interp(at, [x for x, _ in c], [y for _, y in c])


def matched_difference(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Mean over the common learning range of F_a - F_b (their frontiers); NaN when there is no common range."""
    rng = common_range(a, b)
    if rng is None:
        return float("nan")
    grid = np.linspace(rng[0], rng[1], GRID)
    return float(np.mean(level(a, grid) - level(b, grid)))


def compared_forgetting(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The larger forgetting either frontier reaches inside the common range (at its top, as frontiers rise):
    the scale of an equivalence margin. Points outside the range (a diverged LR) must not widen it."""
    rng = common_range(a, b)
    return float("nan") if rng is None else float(max(abs(level(a, rng[1])), abs(level(b, rng[1]))))


def matched_boot(la: np.ndarray, fa: np.ndarray, lb: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """matched_difference on every bootstrap replicate (the frontiers refitted each time).

    la, fa: (B, n_a) learning and forgetting of a's points per replicate; lb, fb likewise for b.
    """
    return np.array([matched_difference(list(zip(la[k], fa[k])), list(zip(lb[k], fb[k]))) for k in range(la.shape[0])])
