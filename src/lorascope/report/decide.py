"""Turning a bootstrapped difference into a verdict that can abstain (what would resolve it: whatif.py).

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


def holm_levels(pvalues: list[float], alpha: float = ALPHA) -> list[float]:
    """The level Holm's step-down tests each hypothesis at: alpha / (m - rank), rank 0 for the smallest p."""
    m = len(pvalues)
    out = [alpha] * m
    for rank, i in enumerate(np.argsort(pvalues, kind="stable")):
        out[i] = alpha / (m - rank)
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
    alpha: float = ALPHA,
) -> tuple[str, str]:
    """(verdict, reason) for a difference whose paper-direction sign is yes_sign (-1: smaller is "yes").
    p_adjusted / p_tost_adjusted: the difference's and the equivalence test's Holm-adjusted p-values (both in
    one family); without p_tost_adjusted the equivalence test is the unadjusted TOST on boot. alpha: the family's
    level (below 0.05 at a repeated look, after alpha spending)."""
    lo, hi = percentile_interval(boot, 0.95)
    at = "" if alpha == ALPHA else f" < alpha {alpha:.3g}"
    if p_adjusted < alpha:
        v = "yes" if np.sign(estimate) == yes_sign else "reversed"
        return (
            v,
            f"the 95% interval [{lo:+.4g}, {hi:+.4g}] excludes 0 (Holm-adjusted p = {p_adjusted:.3g}{at}, "
            f"{k} test{'s' * (k > 1)})",
        )
    has_margin = margin is not None and margin > 0
    if has_margin and p_tost_adjusted is None:
        p_tost_adjusted = p_tost(boot, margin)
    if has_margin and p_tost_adjusted < alpha:
        return (
            "equivalent",
            f"the difference lies inside the equivalence margin +-{margin:.4g} (TOST, Holm-adjusted p = "
            f"{p_tost_adjusted:.3g}{at})",
        )
    why = f"the 95% interval [{lo:+.4g}, {hi:+.4g}] is too wide: "
    if p_raw is not None and p_raw < alpha:
        why += f"significant alone (p = {p_raw:.3g}) but not after Holm's correction over {k} tests"
    elif p_raw is not None and p_raw < ALPHA:
        why += f"significant at {ALPHA:g} alone (p = {p_raw:.3g}) but not at this look's level (alpha {alpha:.3g})"
    else:
        why += "it includes 0"
    if has_margin:
        why += f", and equivalence within +-{margin:.4g} is not shown (TOST, Holm-adjusted p = {p_tost_adjusted:.3g})"
    return "not resolved", why
