"""Intervals and per-item values from the samples files: the Interval record the tables print, the normal
approximation from two stderrs (for results without samples), and one task's items on one split.

Example::

    >>> stderr_interval(0.5, 0.01, 0.4, 0.01).text()
    '+0.1000 [+0.0723, +0.1277]'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorascope.evals.catalog import spec

from ..splits import split_of
from .collect import Study


@dataclass(frozen=True)
class Interval:
    estimate: float
    lo: float
    hi: float
    n: int | None  # test items (None for the stderr approximation)
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
