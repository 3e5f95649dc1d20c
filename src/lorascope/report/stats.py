"""Intervals for differences: paired bootstrap over the items of one split (seeded), from the samples files.

Two models evaluated on the same items differ item by item far less than their two stderrs suggest, so the
difference is resampled per item (paired). Several seeds of one configuration are averaged per item first.
The paper's forgetting_mean is the mean of three tasks; each task is resampled on its own items and the three
resampled means are averaged. When a samples file is missing the interval falls back to the unpaired normal
approximation from the two stderrs, and says so in ``Interval.method``.

Example::

    >>> a = [{"q1": 1.0, "q2": 1.0, "q3": 0.0}]; b = [{"q1": 0.0, "q2": 1.0, "q3": 0.0}]
    >>> iv = paired_bootstrap([a], [b], seed=0)
    >>> round(iv.estimate, 3), iv.n, iv.method
    (0.333, 3, 'paired bootstrap')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorascope.evals.catalog import FORGETTING_TASKS, MetricSpec, spec

from ..splits import split_of
from .collect import Study

ItemValues = dict[str, float]  # item id -> per-item value of the metric
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    estimate: float
    lo: float
    hi: float
    n: int | None  # paired items (None for the stderr approximation)
    method: str

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.lo > 0 or self.hi < 0

    def flipped(self) -> Interval:
        return Interval(-self.estimate, -self.hi, -self.lo, self.n, self.method)

    def text(self, digits: int = 4) -> str:
        def f(x: float) -> str:
            return f"{round(x, digits) + 0.0:+.{digits}f}"  # + 0.0 turns a rounded -0.0 into +0.0

        return f"{f(self.estimate)} [{f(self.lo)}, {f(self.hi)}]"


def item_values(
    st: Study, run_id: str, ckpt: str | None, s: MetricSpec, split: str = "test", weights: list | None = None
) -> list[ItemValues] | None:
    """Per-item values of one task's headline metric on one split (one dict per part: three for
    forgetting_mean), None without samples. weights: a list that receives each part's {item id: weight} (KL's
    tokens per text; 1 elsewhere)."""
    parts = []
    for task in FORGETTING_TASKS if s.task == "forgetting_mean" else (s.task,):
        got = split_items(st, run_id, ckpt, task, split)
        if got is None:
            return None
        parts.append(got[0])
        if weights is not None:
            weights.append(got[2])
    return parts


def paired_bootstrap(
    a: list[list[ItemValues]],
    b: list[list[ItemValues]],
    seed: int = 0,
    n_boot: int = N_BOOT,
    weights: list[dict] | None = None,
) -> Interval | None:
    """95% percentile interval of mean(a) - mean(b).

    a, b: per seed (outer list), per part (inner list), item values. Items are paired by id over the items
    every seed of both sides has; None when some part has no common item. weights: per part, item id ->
    weight of the item in its part's mean (a token-weighted KL is a ratio of sums; missing: unweighted).
    """
    rng = np.random.default_rng(seed)
    n_parts = len(a[0])
    boot = np.zeros(n_boot)
    est, n_items = 0.0, 0
    for p in range(n_parts):
        ids = set.intersection(*(set(x[p]) for x in a), *(set(x[p]) for x in b))
        if not ids:
            return None
        ids = sorted(ids)
        d = np.array([np.mean([x[p][i] for x in a]) - np.mean([x[p][i] for x in b]) for i in ids])
        w = np.array([(weights[p] if weights else {}).get(i, 1.0) for i in ids], dtype=float)
        if w.sum() <= 0:
            w = np.ones_like(d)
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boot += (d * w)[idx].sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1e-300) / n_parts
        est += float((d * w).sum() / w.sum()) / n_parts
        n_items += len(d)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Interval(est, float(lo), float(hi), n_items, "paired bootstrap")


def stderr_interval(va: float, sa: float | None, vb: float, sb: float | None) -> Interval | None:
    """Unpaired normal approximation: (va - vb) +- 1.96 sqrt(sa^2 + sb^2); None without both stderrs."""
    if sa is None or sb is None or not (math.isfinite(sa) and math.isfinite(sb)):
        return None
    half = 1.96 * math.sqrt(sa**2 + sb**2)
    return Interval(va - vb, va - vb - half, va - vb + half, None, "normal approx. from stderr (unpaired)")


def seed_spread(values: list[float]) -> float | None:
    """Sample standard deviation over seeds (None with one seed)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1))


def split_items(st: Study, run_id: str, ckpt: str | None, task: str, split: str) -> tuple[dict, dict, dict] | None:
    """({item id: value}, {item id: cluster key}, {item id: weight}) of one task's items on one split, or None
    without samples. Weights are 1 unless the metric is weighted (KL: tokens per text).

    Each sample line carries "split" and "cluster"; lines written before those fields existed get the shared
    rule's answer for the cluster "<task>/<id>" (benchmark items are their own cluster). pass@1 of a problem
    with n samples, c passing, is c/n (the unbiased estimator at k=1), so samples of one id are averaged.
    """
    s = spec(task)
    field = s.item_field if s else None
    recs = st.samples(run_id, ckpt, task)
    if recs is None or not field:
        return None
    acc: dict[str, list[float]] = {}
    clusters: dict[str, str] = {}
    weights: dict[str, float] = {}
    for r in recs:
        v = r.get(field)
        if field == "passed" or isinstance(v, bool):
            v = float(bool(v))
        if not isinstance(v, (int, float)) or "id" not in r:
            continue
        i = str(r["id"])
        cl = str(r.get("cluster") or f"{task}/{i}")
        if (r.get("split") or split_of(cl)) != split:
            continue
        acc.setdefault(i, []).append(float(v))
        clusters[i] = cl
        weights[i] = float(r.get(s.weight_field) or 0.0) if s.weight_field else 1.0
    if not acc:
        return None
    return {i: sum(v) / len(v) for i, v in acc.items()}, clusters, weights
