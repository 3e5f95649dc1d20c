"""Intervals for the tables and forest plots: any task, any point against the base or a full-FT reference, from
the same replicates as the headline's verdicts (measure.TestReplicates: item clusters x the pooled seed level).

One TestReplicates per (setting, task) is built on first use and kept on the Study, so a table with a row per
configuration and task reads the samples files once.

Example::

    >>> iv = hierarchical_difference(st, spec("hellaswag"), mine, mine.index(lora), mine.index(full), "tokens")
    >>> iv.text(), iv.method
    ('-0.0100 [-0.0500, +0.0300]', 'hierarchical bootstrap (item clusters x pooled seed noise), test split, 2 seed(s)')
"""

from __future__ import annotations

from lorascope.evals.catalog import MetricSpec

from .bootstrap import N_BOOT, percentile_interval
from .collect import Study
from .measure import TestReplicates
from .stats import Interval

METHOD = "hierarchical bootstrap (item clusters x pooled seed noise), test split"


def replicates(st: Study, s: MetricSpec, mine: list, by: str) -> TestReplicates | None:
    """The test-split replicates of task s over a setting's points (cached on the Study); None without samples."""
    key = (mine[0].setting if mine else None, s.task, by)
    if key not in st.replicates:
        st.replicates[key] = TestReplicates.make(st, mine, s, None, N_BOOT, by) if mine else None
    return st.replicates[key]


def hierarchical_difference(st: Study, s: MetricSpec, mine: list, i: int, j: int | None, by: str) -> Interval | None:
    """Signed (learning or forgetting, per s.role) difference of point mine[i] over mine[j] (None: the base) on
    the test split, with its interval; None when either lacks samples of s."""
    rep = replicates(st, s, mine, by)
    if rep is None or i not in rep.both.learning or (j is not None and j not in rep.both.learning):
        return None
    est, boot = rep.both.learning[i], rep.arm("learning", i)
    if j is not None:
        est, boot = est - rep.both.learning[j], boot - rep.arm("learning", j)
    lo, hi = percentile_interval(boot)
    n = min(rep.n_seeds(k) for k in (i, j) if k is not None)
    return Interval(est, lo, hi, rep.both.tables[0].n_items, f"{METHOD}, {n} seed(s)")
