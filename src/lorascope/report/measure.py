"""Learning and forgetting of every point of a setting on one split, with hierarchical-bootstrap replicates.

A point's learning (or forgetting) is its signed difference from the base model on the items of one split
(validation for choices, test for reported numbers), computed on every bootstrap replicate with the base
model resampled on the same item clusters, so differences between points are paired item by item.
The paper's forgetting_mean averages three tasks; each task is resampled on its own clusters.

Example::

    >>> m = measure_split(st, ps, L, F, "test", n_boot=500)
    >>> m.learning[0], m.boot_learning[0].shape      # point 0: test-split learning over the base
    (0.104, (500,))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorascope.evals.catalog import FORGETTING_TASKS, MetricSpec, signed

from ..splits import effective_clusters
from .bootstrap import N_BOOT, ClusterTable, Draws, cluster_widen
from .collect import BASE, Study
from .noise import SeedLevel, Unit, seed_level
from .stats import split_items


def parts(s: MetricSpec) -> tuple[str, ...]:
    return FORGETTING_TASKS if s.task == "forgetting_mean" else (s.task,)


def tables(st: Study, ps: list, s: MetricSpec, split: str) -> list[ClusterTable] | None:
    """One cluster table per part of s over the points (keys: index in ps) and the base; points lacking a
    part's samples are left out of every part, so all tables hold the same arms. None without the base."""
    loaded: dict[str, dict] = {}
    cluster_of: dict[str, dict] = {}
    weight: dict[str, dict] = {}
    for task in parts(s):
        got, cl, wt = {}, {}, {}
        arms = {i: [(rid, p.checkpoint, st.run(rid).get("seed")) for rid in p.run_ids] for i, p in enumerate(ps)}
        arms[BASE] = [(BASE, None, BASE)]
        for key, runs in arms.items():
            by_seed = {}
            for rid, ck, seed in runs:
                r = split_items(st, rid, ck, task, split)
                if r is None:
                    break
                by_seed[seed] = r[0]
                cl.update(r[1])
                wt.update(r[2])
            else:
                got[key] = by_seed
        loaded[task], cluster_of[task], weight[task] = got, cl, wt
    keep = set.intersection(*(set(v) for v in loaded.values()))
    if BASE not in keep:
        return None
    out = [
        ClusterTable.build({k: v for k, v in loaded[t].items() if k in keep}, cluster_of[t], weight[t])
        for t in parts(s)
    ]
    return out if all(t.n_items and t.counts.sum() > 0 for t in out) else None


def _means(ts: list[ClusterTable], draws: Draws) -> tuple[dict, dict]:
    est: dict = {}
    boot: dict = {}
    for t in ts:
        e, b = t.means(draws)
        for k in e:
            est[k] = est.get(k, 0.0) + e[k] / len(ts)
            boot[k] = boot.get(k, 0.0) + b[k] / len(ts)
    return est, boot


@dataclass
class SplitMeasure:
    """Signed learning / forgetting (vs the base) per point index, with replicates; F parts empty without F."""

    split: str
    learning: dict
    boot_learning: dict
    forgetting: dict = field(default_factory=dict)
    boot_forgetting: dict = field(default_factory=dict)
    tables: list = field(default_factory=list)
    n_boot: int = N_BOOT

    @property
    def n_seeds(self) -> tuple[int, int]:
        """(fewest, most) seeds of a point."""
        n = [len(s) for t in self.tables for k, s in t.seeds.items() if k != BASE] or [0]
        return min(n), max(n)


def measure_split(
    st: Study,
    ps: list,
    L: MetricSpec,
    F: MetricSpec | None,
    split: str,
    n_boot: int = N_BOOT,
    resample: str = "both",
    seed: int = 0,
    read: tuple | None = None,
) -> SplitMeasure | None:
    """Learning (and forgetting) of every point on one split; L and F share one seed draw per replicate.
    read: the (learning, forgetting) tables of this split when already read from the samples files."""
    lt, ft = read or (tables(st, ps, L, split), tables(st, ps, F, split) if F is not None else None)
    if lt is None:
        return None
    draws = Draws.make(lt + (ft or []), n_boot, seed, resample)
    m = SplitMeasure(split, *_signed(lt, draws, L), tables=lt + (ft or []), n_boot=n_boot)
    if ft is not None:
        m.forgetting, m.boot_forgetting = _signed(ft, draws, F)
    return m


def _signed(ts: list[ClusterTable], draws: Draws, s: MetricSpec) -> tuple[dict, dict]:
    est, boot = _means(ts, draws)
    return (
        {k: signed(s, v, est[BASE]) for k, v in est.items() if k != BASE},
        {k: np.asarray(signed(s, v, boot[BASE])) for k, v in boot.items() if k != BASE},
    )


def seed_values(ts: list[ClusterTable], s: MetricSpec) -> dict:
    """Point key -> (n_seeds,) signed value (learning or forgetting vs the base's estimate) of each seed's mean over
    the split's items (the parts of forgetting_mean averaged): the data of the pooled seed variance."""
    out: dict = {}
    for t in ts:
        base = float(t.sums[BASE].sum() / (len(t.sums[BASE]) * t.counts.sum()))
        for k, rows in t.sums.items():
            if k != BASE:
                v = np.array([signed(s, float(r.sum() / t.counts.sum()), base) for r in rows])
                out[k] = out.get(k, 0.0) + v / len(ts)
    return out


def units_of(ps: list, by: str) -> dict:
    """Point index -> noise.Unit: its budget, its configuration (method, LR, role), pooled if a main run."""
    return {
        i: Unit(p.position(by), (p.method, p.lr, p.role), p.role == "main" and not p.diverged) for i, p in enumerate(ps)
    }


@dataclass
class TestReplicates:
    """The test split's replicates that every reported interval reads (``both``): item clusters resampled (seeds
    fixed, widened for few or unequal clusters: bootstrap.cluster_widen) plus each point's seed-mean error drawn
    from the pooled seed covariance (noise.py); ``seeds`` and ``clusters`` hold each level alone (the variance
    parts of "what it would take")."""

    both: SplitMeasure
    seeds: SplitMeasure
    clusters: SplitMeasure
    level: SeedLevel
    n_clusters: int  # fewest raw item clusters of a compared task on the test split
    n_clusters_eff: float  # fewest effective (Kish) item clusters of a compared task

    @classmethod
    def make(
        cls, st: Study, ps: list, L: MetricSpec, F: MetricSpec | None, n_boot: int = N_BOOT, by: str = "tokens"
    ) -> TestReplicates | None:
        lt, ft = tables(st, ps, L, "test"), tables(st, ps, F, "test") if F is not None else None
        return None if lt is None else cls.from_tables(lt, ft, L, F, units_of(ps, by), n_boot)

    @classmethod
    def from_tables(
        cls,
        lt: list[ClusterTable],
        ft: list[ClusterTable] | None,
        L: MetricSpec,
        F: MetricSpec | None,
        units: dict,
        n_boot: int = N_BOOT,
        seed: int = 0,
    ) -> TestReplicates:
        """The replicates from cluster tables (keys: point keys and BASE); units: point key -> noise.Unit. The
        calibration bench calls this with simulated tables."""
        ts = lt + (ft or [])
        clus = measure_split(None, [], L, F, "test", n_boot, resample="clusters", seed=seed, read=(lt, ft))
        n_c = min(len(t.clusters) for t in ts)
        n_eff = min(effective_clusters(t.counts) for t in ts)
        k = cluster_widen(n_c, n_eff)
        keys = [("learning", L)] + ([("forgetting", F)] if ft is not None else [])
        vals = {name: seed_values(lt if name == "learning" else ft, s) for name, s in keys}
        level = seed_level(vals, {u: units[u] for u in units if u in vals["learning"]})
        n_seeds = {key: len(lt[0].seeds[key]) for key in vals["learning"]}
        errs = level.draws({u: units[u] for u in level.of}, n_seeds, n_boot, seed + 1)
        both, alone = _copy(clus), _copy(clus)
        for j, (name, _) in enumerate(keys):
            est, cb = getattr(clus, name), getattr(clus, f"boot_{name}")
            for i in est:
                e = errs[i][:, j] if i in errs else 0.0
                cb[i] = est[i] + k * (cb[i] - est[i])
                getattr(both, f"boot_{name}")[i] = cb[i] + e
                getattr(alone, f"boot_{name}")[i] = est[i] + e * np.ones(n_boot)
        return cls(both, alone, clus, level, n_c, n_eff)

    def of(self, stat) -> np.ndarray:
        """Replicates of stat(SplitMeasure) -> (B,) array: the interval every verdict and table reads."""
        return stat(self.both)

    def variances(self, stat) -> tuple[float, float]:
        """(seed level alone, item clusters alone) variance of a statistic's replicates (robust_var)."""
        return robust_var(stat(self.seeds)), robust_var(stat(self.clusters))

    def arm(self, key: str, i) -> np.ndarray:
        """Replicates of one point's learning or forgetting over the base."""
        return getattr(self.both, f"boot_{key}")[i]

    def n_seeds(self, i) -> int:
        return len(self.both.tables[0].seeds[i])

    def noise(self) -> str:
        """What the intervals cover, in words (seeds, clusters, items, the seed level's pooling)."""
        t = self.both.tables
        lo, hi = self.both.n_seeds
        ns = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return (
            f"{ns} seed(s) x {self.n_clusters} item clusters (effective {self.n_clusters_eff:.1f}, Kish; "
            f"{t[0].n_items} items), {self.both.n_boot} bootstrap replicates; {self.level.describe()}"
        )


def robust_var(x: np.ndarray) -> float:
    """The squared half-width of the central 68.3% of the finite replicates: the variance for a normal, and a
    finite scale for the seed level's Student t on 2 degrees of freedom (which has no variance)."""
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan")
    lo, hi = np.quantile(x, [0.158655, 0.841345])
    return float(((hi - lo) / 2) ** 2)


def _copy(m: SplitMeasure) -> SplitMeasure:
    return SplitMeasure(
        m.split,
        dict(m.learning),
        dict(m.boot_learning),
        dict(m.forgetting),
        dict(m.boot_forgetting),
        m.tables,
        m.n_boot,
    )
