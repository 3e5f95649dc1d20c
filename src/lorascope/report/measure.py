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

from .bootstrap import N_BOOT, ClusterTable, Draws, small_sample_widen
from .collect import BASE, Study
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


@dataclass
class TestReplicates:
    """The test split measured under three resamplings (both levels; seeds only; item clusters only), so that
    any statistic's replicates can be widened for few seeds or clusters (bootstrap.small_sample_widen)."""

    both: SplitMeasure
    seeds: SplitMeasure
    clusters: SplitMeasure

    @classmethod
    def make(
        cls, st: Study, ps: list, L: MetricSpec, F: MetricSpec | None, n_boot: int = N_BOOT, var_boot: int = 300
    ) -> TestReplicates | None:
        read = (tables(st, ps, L, "test"), tables(st, ps, F, "test") if F is not None else None)
        both = measure_split(st, ps, L, F, "test", n_boot, read=read)
        if both is None:
            return None
        return cls(
            both,
            *(
                measure_split(st, ps, L, F, "test", var_boot, resample=m, seed=1, read=read)
                for m in ("seeds", "clusters")
            ),
        )

    @property
    def n_clusters(self) -> int:
        return min(len(t.clusters) for t in self.both.tables)

    def of(self, stat, theta: float, n_seeds: int) -> np.ndarray:
        """Widened replicates of stat(SplitMeasure) -> (B,) array, centred on its estimate theta."""
        return small_sample_widen(
            theta, stat(self.both), stat(self.seeds), stat(self.clusters), n_seeds, self.n_clusters
        )

    def variances(self, stat) -> tuple[float, float]:
        """(seeds-only, clusters-only) bootstrap variance of a statistic: the power note's inputs."""
        return float(np.nanvar(stat(self.seeds))), float(np.nanvar(stat(self.clusters)))

    def arm(self, key: str, i) -> np.ndarray:
        """Widened replicates of one point's learning or forgetting over the base."""
        est = getattr(self.both, key)
        return self.of(
            lambda m: getattr(m, f"boot_{key}")[i],
            est[i],
            len(next(s for t in self.both.tables for k, s in t.seeds.items() if k == i)),
        )
