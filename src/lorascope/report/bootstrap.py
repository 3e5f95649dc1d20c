"""Hierarchical bootstrap over training seeds and evaluation-item clusters (numpy only, vectorised).

Two sources of noise enter every number of a study: which training run (seed: init, data order, dropout) and
which evaluation items. A replicate resamples seeds with replacement and item clusters with replacement
(Davison & Hinkley 1997, sec. 3.8, two-stage sampling), and every configuration ("arm") of a comparison is
recomputed on the SAME replicate:

- clusters: one draw per replicate and task, shared by every arm and every resampled seed. In a study every
  seed and every method is scored on the same items, so an item's difficulty is shared (a crossed design);
  redrawing clusters independently per seed would treat it as fresh noise per seed and make intervals too
  narrow. Resampling both factors of a crossed design is Owen's "pigeonhole" bootstrap (Ann. Appl. Stat. 2007),
  which is mildly conservative.
- seeds: arms with the same seed ids share one seed draw, so seed s of method A stays paired with seed s of
  method B (training's data order is a function of seed and step, the same for every method); arms with other
  seed sets (the base model: one "seed") get their own draw.

Resampling two seeds gives three distinct seed draws and no measure of the spread they miss, so the reported
intervals (measure.TestReplicates) resample the item clusters here (seeds held fixed, widened for few or unequal
clusters: ``cluster_widen``) and draw the seed level from the seed variance pooled over the study's main
configurations (``pooled_covariance``, ``seed_effect_draws``: Student t on the pooled degrees of freedom).

Example::

    >>> t = ClusterTable.build({"a": {0: {"x": 1.0, "y": 0.0}}, "b": {0: {"x": 0.0, "y": 0.0}}},
    ...                        {"x": "c1", "y": "c2"})
    >>> est, boots = t.means(Draws.make([t], n_boot=200, seed=0))
    >>> est["a"] - est["b"], boots["a"].shape
    (0.5, (200,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 1000


@dataclass(eq=False)  # hashed by identity: Draws keys its cluster weights by table
class ClusterTable:
    """Per-arm weighted sums of item values by (seed, cluster) over the items every arm and seed has (paired)."""

    clusters: list[str]
    counts: np.ndarray  # (C,) total item weight per cluster (items, or tokens for a token-weighted metric)
    seeds: dict  # arm -> tuple of seed ids (rows of its sums)
    sums: dict  # arm -> (S_arm, C) weighted sum of item values
    n_items: int = 0

    @classmethod
    def build(cls, values: dict, cluster_of: dict, weight: dict | None = None) -> ClusterTable:
        """values: arm -> seed -> {item id: value}; cluster_of: item id -> cluster key (missing = own cluster);
        weight: item id -> weight of its value in the mean (missing = 1; the same for every arm)."""
        per_seed = [items for seeds in values.values() for items in seeds.values()]
        common = sorted(set.intersection(*(set(v) for v in per_seed))) if per_seed else []
        keys = sorted({cluster_of.get(i, i) for i in common})
        col = {k: j for j, k in enumerate(keys)}
        idx = np.array([col[cluster_of.get(i, i)] for i in common], dtype=int)
        w = np.array([(weight or {}).get(i, 1.0) for i in common], dtype=float)
        counts = np.bincount(idx, weights=w, minlength=len(keys))
        seeds, sums = {}, {}
        for arm, by_seed in values.items():
            seeds[arm] = tuple(sorted(by_seed, key=str))
            rows = [
                np.bincount(idx, weights=w * np.array([by_seed[s][i] for i in common]), minlength=len(keys))
                for s in seeds[arm]
            ]
            sums[arm] = np.array(rows, dtype=float).reshape(len(rows), len(keys))
        return cls(keys, counts, seeds, sums, len(common))

    def means(self, draws: Draws) -> tuple[dict, dict]:
        """(point estimate per arm, (B,) replicate means per arm): weighted mean over seeds x items."""
        cw = draws.clusters[self]  # (B, C) resampled cluster multiplicities
        est, boots = {}, {}
        for arm, s in self.sums.items():
            sw = draws.seeds[self.seeds[arm]]  # (B, S)
            est[arm] = float(s.sum() / (len(s) * self.counts.sum()))
            num = np.einsum("bs,sc,bc->b", sw, s, cw)
            boots[arm] = num / (sw.sum(1) * (cw @ self.counts))
        return est, boots


@dataclass
class Draws:
    """The resampling weights of one bootstrap: per seed set (B, S) and per table (B, C)."""

    seeds: dict
    clusters: dict
    n_boot: int

    @classmethod
    def make(cls, tables: list[ClusterTable], n_boot: int = N_BOOT, seed: int = 0, resample: str = "both") -> Draws:
        """Weights for every table; resample: "both", "seeds" or "clusters" (the other held fixed)."""
        rng = np.random.default_rng(seed)
        seeds, clusters = {}, {}
        for t in tables:
            for ss in t.seeds.values():
                if ss not in seeds:
                    seeds[ss] = _multinomial(rng, len(ss), n_boot, resample in ("both", "seeds"))
            clusters[t] = _multinomial(rng, len(t.clusters), n_boot, resample in ("both", "clusters"))
        return cls(seeds, clusters, n_boot)


def _multinomial(rng: np.random.Generator, n: int, n_boot: int, resample: bool) -> np.ndarray:
    """(n_boot, n) multiplicities of n units drawn with replacement (all ones when not resampled)."""
    if not resample or n <= 1:
        return np.ones((n_boot, n))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def percentile_interval(boot: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite replicates (a replicate can be undefined, e.g. no common range)."""
    b = boot[np.isfinite(boot)]
    a = (1 - level) / 2
    lo, hi = np.quantile(b, [a, 1 - a])
    return float(lo), float(hi)


def p_two_sided(boot: np.ndarray) -> float:
    """Bootstrap p-value of "the statistic is 0": twice the smaller tail share, floored at 1/(B+1)."""
    b = boot[np.isfinite(boot)]
    tail = min((b <= 0).sum(), (b >= 0).sum())
    return float(min(1.0, max(2 * tail, 1) / (len(b) + 1)))


def p_one_sided(boot: np.ndarray) -> float:
    """Bootstrap p-value of "the statistic is <= 0" against "> 0": (1 + replicates <= 0) / (B + 1)."""
    b = boot[np.isfinite(boot)]
    return float(min(1.0, (1 + (b <= 0).sum()) / (len(b) + 1)))


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (p > 0.5, df >= 1); numpy only, as scipy is not a dependency of the report.

    With x = sqrt(df) tan(u) the density becomes proportional to cos(u)^(df-1) on (-pi/2, pi/2): smooth and
    bounded, so a trapezoid rule on a fine grid of u gives the CDF to ~1e-7.
    """
    u = np.linspace(0.0, math.pi / 2, 20_001)
    dens = np.cos(u) ** (df - 1)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2)])
    cdf = 0.5 + 0.5 * cdf / cdf[-1]  # half the mass on each side of 0
    return float(math.sqrt(df) * math.tan(np.interp(p, cdf, u)))


def cluster_widen(n_clusters: int, n_eff: float, level: float = 0.95) -> float:
    """Factor for the item-cluster deviations of a percentile bootstrap over few (or unequal) clusters.

    A percentile interval over C clusters behaves like a z interval with the plug-in variance (C-1)/C of the
    unbiased one; with unequal sizes the information is that of Kish's effective count, not C. The factor
    sqrt(C/(C-1)) * t_{n_eff-1} / z makes the item level's spread that of a Student-t interval on n_eff - 1
    degrees of freedom (measured coverage: tests/test_verdicts.py).
    """
    if n_clusters <= 1:
        return 1.0
    q = 1 - (1 - level) / 2
    df = max(1.0, n_eff - 1.0)
    t = t_quantile(q, df) if df < 1e4 else _z(q)
    return math.sqrt(n_clusters / (n_clusters - 1)) * t / _z(q)


def pooled_covariance(groups: list[np.ndarray]) -> tuple[np.ndarray | None, int]:
    """(pooled within-group covariance, its degrees of freedom) of (n_i, k) arrays of per-seed values:
    sum_i (n_i - 1) S_i / sum_i (n_i - 1), the textbook pooled estimate (one-way layout, seeds within
    configurations). Groups of one seed add nothing; (None, 0) when no group has two."""
    groups = [np.atleast_2d(np.asarray(g, dtype=float)) for g in groups if len(g) >= 2]
    if not groups:
        return None, 0
    df = sum(len(g) - 1 for g in groups)
    ss = sum((g - g.mean(0)).T @ (g - g.mean(0)) for g in groups)
    return np.asarray(ss, dtype=float) / df, df


def seed_effect_draws(cov: np.ndarray, scale: np.ndarray, z: np.ndarray, n_seeds: int) -> np.ndarray:
    """(B, k) draws of the seed-mean error of a point with n_seeds runs from a pooled covariance: z (B, k) standard
    normals times cov^(1/2) / sqrt(n_seeds), times sqrt(scale) per replicate. With scale = df / chi2_df (one draw
    per replicate, ``t_scales``) each coordinate is a scaled Student t on the pooled df: a parametric bootstrap of
    the seed level (with 2 seeds a resampling bootstrap has three distinct outcomes and no estimate of the spread
    it misses)."""
    w, v = np.linalg.eigh(cov)
    root = v @ np.diag(np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return np.sqrt(scale)[:, None] * (z @ root.T) / math.sqrt(n_seeds)


def t_scales(rng: np.random.Generator, df: int, n_boot: int) -> np.ndarray:
    """(B,) variance scales df / chi2_df: the uncertainty of a variance estimated on df degrees of freedom."""
    return df / rng.chisquare(df, n_boot)


def _z(p: float) -> float:
    """Standard normal quantile by bisection on erf (p in (0.5, 1))."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p else (lo, mid)
    return (lo + hi) / 2
