"""The validation / test split of every evaluation pool: one deterministic rule, shared by evals and the report.

    split_of("hellaswag/1234")              -> 'validation' or 'test' (the same answer on every machine)
    split_of("heldout/stdlib/email")        -> a held-out window's cluster is its package ("heldout/<group>",
                                               evals.texts.heldout_windows): the whole package lands on one side

Selections (learning rates, the best configuration) read the validation split only; every number in a report's
headline comes from the test split, so no choice is scored on the items it was made with (see
shared verdict methods: "selection without a winner's curse"). Items that are correlated (windows of one source
file or package) share one cluster key, so a cluster never sits on both sides.

The rule is a hash of the cluster key, not a random draw: it needs no stored list, is the same for every model
and every study, and a report can recompute it from the sample files alone.
"""

from __future__ import annotations

import hashlib

SPLITS = ("validation", "test")
VALIDATION_FRACTION = 0.5


def split_of(cluster: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """'validation' for about `validation_fraction` of cluster keys (by SHA-1 of the key), else 'test'."""
    h = int.from_bytes(hashlib.sha1(cluster.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if h < validation_fraction else "test"


def effective_clusters(sizes) -> float:
    """Kish's effective number of clusters, (sum of sizes)^2 / sum of squared sizes: 5 clusters of sizes
    {19, 1, 1, 1, 1} count as 1.4, because a resample of clusters is mostly a resample of the big one."""
    sizes = [float(s) for s in sizes if s > 0]
    return sum(sizes) ** 2 / sum(s * s for s in sizes) if sizes else 0.0
