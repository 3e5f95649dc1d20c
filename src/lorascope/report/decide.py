"""Turning a bootstrapped difference into a verdict that can abstain, and a note on what would resolve it.

Verdicts (one per question and comparison):
  "yes"            the difference is significant in the paper's direction (after Holm's correction),
  "reversed"       significant the other way,
  "equivalent"     two one-sided tests (TOST, Schuirmann 1987) show the difference inside [-margin, +margin],
  "not resolved"   none of these: the interval is too wide for the data to tell,
  "not comparable" decided by the caller before testing (no common learning range, nothing learned).
A non-significant difference is never read as equivalence: only the margin test says "equivalent".

Family-wise error: Holm-Bonferroni (Holm 1979) over the p-values of the comparisons made together, the
equivalence tests' (the larger of TOST's two one-sided p-values) in the same family; ``holm_levels`` gives the
level each was tested at, and ``holm_interval`` the interval at that level, printed beside the raw 95% one.

Example::

    >>> import numpy as np
    >>> boot = np.random.default_rng(0).normal(-0.2, 0.05, 1000)
    >>> decide(-0.2, boot, p_adjusted=0.001, margin=0.02, yes_sign=-1)[0]
    'yes'
"""

from __future__ import annotations

import numpy as np

from .bootstrap import percentile_interval

ALPHA = 0.05
MARGIN_DEFAULT = "10%"  # equivalence margin: this share of full FT's validation effect (report.margins)
Z_POWER = 1.96 + 0.84  # two-sided 5% test with 80% power


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given), monotone and capped at 1."""
    order = np.argsort(pvalues)
    m = len(pvalues)
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def holm_levels(pvalues: list[float]) -> list[float]:
    """The level Holm's step-down tests each hypothesis at: ALPHA / (m - rank), rank 0 for the smallest p."""
    m = len(pvalues)
    out = [ALPHA] * m
    for rank, i in enumerate(np.argsort(pvalues, kind="stable")):
        out[i] = ALPHA / (m - rank)
    return out


def p_tost(boot: np.ndarray, margin: float) -> float:
    """Bootstrap p-value of equivalence within +-margin (TOST, Schuirmann 1987): the larger of the one-sided
    p-values of "difference <= -margin" and "difference >= +margin", each (1 + replicates beyond) / (B + 1)."""
    b = boot[np.isfinite(boot)]
    lo = (1 + (b <= -margin).sum()) / (len(b) + 1)
    hi = (1 + (b >= margin).sum()) / (len(b) + 1)
    return float(min(1.0, max(lo, hi)))


def holm_interval(estimate: float, lo: float, hi: float, alpha: float, level: float = 0.95) -> tuple[float, float]:
    """The interval at Holm's level 1 - alpha, from the raw one: each side's distance from the estimate scaled by
    z(1 - alpha/2) / z(1 - (1 - level)/2) (the bootstrap's tails are too sparse for a 99.9% percentile)."""
    from .bootstrap import _z

    k = _z(1 - alpha / 2) / _z(1 - (1 - level) / 2)
    return estimate - k * (estimate - lo), estimate + k * (hi - estimate)


def decide(
    estimate: float,
    boot: np.ndarray,
    p_adjusted: float,
    margin: float | None,
    yes_sign: int,
    p_raw: float | None = None,
    k: int = 1,
    p_tost_adjusted: float | None = None,
) -> tuple[str, str]:
    """(verdict, reason) for a difference whose paper-direction sign is yes_sign (-1: smaller is "yes").
    p_adjusted / p_tost_adjusted: the difference's and the equivalence test's Holm-adjusted p-values (both in
    one family); without p_tost_adjusted the equivalence test is the unadjusted TOST on boot."""
    lo, hi = percentile_interval(boot, 0.95)
    if p_adjusted < ALPHA:
        v = "yes" if np.sign(estimate) == yes_sign else "reversed"
        return (
            v,
            f"the 95% interval [{lo:+.4g}, {hi:+.4g}] excludes 0 (Holm-adjusted p = {p_adjusted:.3g}, "
            f"{k} test{'s' * (k > 1)})",
        )
    has_margin = margin is not None and margin > 0
    if has_margin and p_tost_adjusted is None:
        p_tost_adjusted = p_tost(boot, margin)
    if has_margin and p_tost_adjusted < ALPHA:
        return (
            "equivalent",
            f"the difference lies inside the equivalence margin +-{margin:.4g} (TOST, Holm-adjusted p = "
            f"{p_tost_adjusted:.3g})",
        )
    why = f"the 95% interval [{lo:+.4g}, {hi:+.4g}] is too wide: "
    if p_raw is not None and p_raw < ALPHA:
        why += f"significant alone (p = {p_raw:.3g}) but not after Holm's correction over {k} tests"
    else:
        why += "it includes 0"
    if has_margin:
        why += f", and equivalence within +-{margin:.4g} is not shown (TOST, Holm-adjusted p = {p_tost_adjusted:.3g})"
    return "not resolved", why


def power_note(
    estimate: float, var_seeds: float, var_items: float, n_seeds: int, n_clusters: int, margin: float | None = None
) -> str:
    """How many more seeds or effective (Kish) item clusters would resolve the question, from the measured
    variance parts (n_clusters: the effective count).

    var_seeds / var_items: bootstrap variance of the statistic when only seeds / only item clusters are
    resampled. Each shrinks in proportion to its own count, so with k times the clusters the variance is about
    var_seeds + var_items / k. The target is the variance at which a true difference of |estimate| (or the
    margin, when the estimate is ~0) is found with 80% power.
    """
    effect = abs(estimate) if margin is None else max(abs(estimate), margin)
    if effect <= 0 or not np.isfinite(effect):
        return "no effect size to plan for"
    target = (effect / Z_POWER) ** 2
    out = []
    for what, n, mine, other in (
        ("effective item clusters", n_clusters, var_items, var_seeds),
        ("seeds", n_seeds, var_seeds, var_items),
    ):
        if mine <= 0 or n < 1 or (what == "seeds" and n < 2):
            continue
        if target <= other:
            out.append(f"more {what} alone cannot resolve it (the other source's noise is already too large)")
        else:
            k = mine / (target - other)
            out.append(f"about {int(np.ceil(max(k, 1.0) * n))} {what} (now {n})")
    if not out:
        return "the variance parts could not be measured"
    return f"for 80% power to see a difference of {effect:.3g}: " + "; or ".join(out)
