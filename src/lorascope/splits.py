"""The validation / test split of every evaluation pool: one deterministic rule, shared by evals and the report.

    split_of("hellaswag/1234")              -> 'validation' or 'test' (the same answer on every machine)
    split_of("heldout/stdlib/email")        -> a held-out window's cluster is the unit it was held out with
                                               (evals.texts.heldout_windows): the whole package lands on one side
    split_of("heldout/sympy#solvers")       -> the split hashes "heldout/sympy" (split_unit): every subpackage of
                                               sympy sits on the side the library does; the cluster (what the
                                               bootstrap resamples, what Kish counts) stays the subpackage

Selections (learning rates, the best configuration) read the validation split only; every number in a report's
headline comes from the test split, so no choice is scored on the items it was made with (see
shared verdict methods: "selection without a winner's curse"). Items that are correlated (windows of one source
file or package) share one cluster key, so a cluster never sits on both sides.

The split unit and the cluster: a cluster key "<unit>#<sub>" is split on "<unit>" (the part before the first
UNIT_SEP) and clustered on the whole key. A library (sympy, mpmath; each stdlib top-level package on its own)
is the unit, so no library sits on both sides of the split, while its subpackages (or files) stay separate
clusters within that side. A key without UNIT_SEP is its own unit. ``cluster_key`` builds such keys.

The rule is a hash of the split unit, not a random draw: it needs no stored list, is the same for every model
and every study, and a report can recompute it from the sample files' ``cluster`` field alone.
"""

from __future__ import annotations

import hashlib

SPLITS = ("validation", "test")
VALIDATION_FRACTION = 0.5
UNIT_SEP = "#"


def cluster_key(unit: str, sub: str | None = None) -> str:
    """The key "<unit>#<sub>" (split on unit, clustered on both), or unit alone; a '#' inside unit is escaped,
    so a unit named by a user (data.group_field) is always split as a whole."""
    unit = unit.replace(UNIT_SEP, "%23")
    return f"{unit}{UNIT_SEP}{sub}" if sub else unit


def split_unit(cluster: str) -> str:
    """The part of a cluster key that decides its split: everything before the first UNIT_SEP."""
    return cluster.split(UNIT_SEP, 1)[0]


def split_of(cluster: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """'validation' for about `validation_fraction` of split units (by SHA-1 of split_unit(cluster)), else 'test'."""
    key = split_unit(cluster)
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if h < validation_fraction else "test"


def effective_clusters(sizes) -> float:
    """Kish's effective number of clusters, (sum of sizes)^2 / sum of squared sizes: 5 clusters of sizes
    {19, 1, 1, 1, 1} count as 1.4, because a resample of clusters is mostly a resample of the big one."""
    sizes = [float(s) for s in sizes if s > 0]
    return sum(sizes) ** 2 / sum(s * s for s in sizes) if sizes else 0.0
