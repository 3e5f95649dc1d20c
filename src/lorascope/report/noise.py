"""Training noise (the seed level) of a study's points, pooled over its main configurations.

A point's value is the mean over its seeds; its training noise is the spread of that mean over repeated training
runs. With 2 seeds a point's own estimate of that spread has 1 degree of freedom, and a resampling bootstrap
over 2 seeds sees three outcomes: intervals built on it under-cover (about 87% for a paired difference when seed
noise dominates). The standard remedy is the one-way layout's pooled variance: every main configuration's
between-seed covariance of (learning, forgetting) at a budget is one estimate of the same training noise, and
their pooled covariance has sum(n_i - 1) degrees of freedom (Searle, Casella & McCulloch 1992, ch. 3). Each point
then draws its seed-mean error from that covariance over its own seed count n_i, scaled by sqrt(df / chi2_df)
per replicate (Student t on the pooled df), so a comparison uses the seeds of the points it compares, an
LR-search point with 1 seed gets a full run's training noise, and points with at least POOL_OWN seeds use their
own covariance.

Draws are shared by the checkpoints of one configuration (one run makes them all: its seed luck is the same
luck at 4k and 32k tokens; treating them as independent would understate the noise of a mean over budgets).
Two methods trained with the same seed share the data order, which makes their difference less noisy than
the sum of their seed variances; the draws are independent per configuration, so a paired difference's
interval is, if anything, conservative.

Example::

    >>> units = {0: Unit(4096, ("full", 1e-4, "main"), True), 1: Unit(4096, ("lora", 1e-3, "main"), True)}
    >>> lv = seed_level({"learning": {0: np.array([0.10, 0.12]), 1: np.array([0.09, 0.13])}}, units)
    >>> lv.groups[4096][1]   # pooled degrees of freedom: one per configuration with 2 seeds
    2
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bootstrap import pooled_covariance, seed_effect_draws, t_scales

POOL_OWN = 5  # a point with at least this many seeds uses its own seed covariance (4 degrees of freedom or more)


@dataclass(frozen=True)
class Unit:
    """What the seed level needs of a point: its budget, its configuration (whose checkpoints share training runs),
    and whether its seeds enter the pooled estimate (a main run that did not diverge)."""

    budget: float | None
    config: tuple
    pooled: bool


@dataclass
class SeedLevel:
    """Seed covariance groups: key -> ((k, k) covariance of one run's values, degrees of freedom); a point's group
    is its budget's pooled estimate (or the nearest budget's that has one), or ("own", point) with >= POOL_OWN."""

    names: tuple  # the coordinates: ("learning",) or ("learning", "forgetting")
    groups: dict = field(default_factory=dict)
    of: dict = field(default_factory=dict)  # point key -> group key (absent: no estimate, items only)
    n_configs: dict = field(default_factory=dict)  # group key -> configurations pooled

    def describe(self) -> str:
        """In words, for the noise line of a verdict."""
        pooled = [(g, df) for g, (_, df) in self.groups.items() if not (isinstance(g, tuple) and g[0] == "own")]
        if not pooled and not self.groups:
            return "no point has 2 seeds: intervals cover evaluation items only, not training noise"
        dfs = sorted({df for _, df in pooled})
        n = sorted({self.n_configs[g] for g, _ in pooled})
        span = lambda xs: f"{xs[0]}" if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"  # noqa: E731
        return (
            f"training noise: seed variance pooled over {span(n)} main configuration(s) per budget "
            f"(Student t on {span(dfs)} degrees of freedom)"
            if pooled
            else "training noise: each point's own seed variance"
        )

    def draws(self, units: dict, n_seeds: dict, n_boot: int, seed: int = 0) -> dict:
        """Point key -> (B, k) seed-mean errors; one standard-normal draw per configuration (shared by its
        budgets) and one chi-square scale per group and replicate."""
        rng = np.random.default_rng(seed)
        configs = sorted({u.config for u in units.values()}, key=repr)
        z = {c: rng.standard_normal((n_boot, len(self.names))) for c in configs}
        out = {}
        for g, (cov, df) in sorted(self.groups.items(), key=lambda x: repr(x[0])):
            scale = t_scales(rng, df, n_boot)
            for key, u in units.items():
                if self.of.get(key) == g:
                    out[key] = seed_effect_draws(cov, scale, z[u.config], n_seeds[key])
        return out


def seed_level(values: dict, units: dict) -> SeedLevel:
    """values: coordinate name -> point key -> (n_seeds,) per-seed values (the same seeds in every coordinate; a
    point may lack all but the first); units: point key -> Unit. Pools the covariance of the `pooled` points that
    have every coordinate, per budget; every point of the first coordinate is assigned a group."""
    names = tuple(values)
    keys = [k for k in units if k in values[names[0]]]
    per = {k: np.stack([_col(values[n], k, len(values[names[0]][k])) for n in names], axis=1) for k in keys}
    full = [k for k in keys if np.isfinite(per[k]).all()]  # a point lacking a coordinate is drawn, not pooled
    lv = SeedLevel(names)
    budgets = sorted({units[k].budget for k in full if units[k].pooled}, key=lambda b: (b is None, b or 0))
    for b in budgets:
        members = [per[k] for k in full if units[k].pooled and units[k].budget == b]
        cov, df = pooled_covariance(members)
        if cov is not None:
            lv.groups[b] = (cov, df)
            lv.n_configs[b] = sum(1 for m in members if len(m) >= 2)
    for k in keys:
        if len(per[k]) >= POOL_OWN and k in full:
            lv.groups[("own", k)] = pooled_covariance([per[k]])
            lv.n_configs[("own", k)] = 1
            lv.of[k] = ("own", k)
        elif (g := _nearest(units[k].budget, [g for g in lv.groups if not isinstance(g, tuple)])) is not None:
            lv.of[k] = g
    return lv


def _col(by_key: dict, k, n: int) -> np.ndarray:
    """A coordinate's per-seed values of point k, NaN where the point lacks that coordinate (no samples)."""
    return np.asarray(by_key[k], dtype=float) if k in by_key else np.full(n, np.nan)


def _nearest(budget, have: list):
    """The budget among `have` closest to `budget` (itself when present); None when there is none."""
    if not have:
        return None
    if budget in have:
        return budget
    num = [h for h in have if h is not None]
    if budget is None or not num:
        return have[0]
    return min(num, key=lambda h: abs(h - budget))
