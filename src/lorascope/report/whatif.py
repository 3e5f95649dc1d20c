"""What an unresolved verdict still says, and what it would take to resolve it, priced from the study's own jobs.

For every comparison whose verdict is "not resolved" (a `records.Comparison`), three facts:

1. **What the data exclude**: the ends of its interval at the level it was tested at (Holm), read as one-sided
   bounds relative to full FT's own effect: "LoRA learns at most 5% less than full FT here".
2. **What this design could have seen**: the minimum detectable effect (MDE) at its Holm level with 80% power,
   ``(t_{1-a/2} + t_{0.8}) * se`` on its degrees of freedom.
3. **What it would take** to detect 10%, 25% and 50% of full FT's effect: seeds, effective item clusters (Kish)
   or both, from the variance model ``se^2 ~ v_seed / n_seeds + v_cluster / n_eff`` (v: one seed's, one effective
   cluster's share; the record's var_seed / var_cluster are the estimate's, at its own counts) scaled to the reported
   se, each costed in CPU-hours from the study's job log (`jobcosts.study_costs`); and, where the gap grows with
   the token budget across at least 3 budgets (a weighted fit on log tokens, |t| >= 2), the budget at which it
   would reach the MDE. Tokens are offered only when the data show such a trend.

Effective clusters grow with an eval group's ``limit`` in proportion (item selection is cluster-balanced and
nested, so a larger limit adds clusters first); when the last evaluation scored fewer items than its limit the
pool is exhausted and more items cannot help. This replaces the post-hoc power note, which planned for the
observed effect.

    >>> rows = whatif_rows(comparisons, Path("studies/quick"))
    >>> print(whatif_text(rows[0]))
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

from .bootstrap import t_quantile
from .jobcosts import StudyCosts, study_costs
from .records import Comparison

TARGETS = (0.10, 0.25, 0.50)  # shares of full FT's own effect to plan for
POWER = 0.80
ALPHA = 0.05  # when a comparison carries no Holm level
MAX_SEEDS = 64
MAX_ITEM_FACTOR = 64.0  # more than 64x today's items is not a plan
_STEP = 1.05  # resolution of the cluster search (5% steps)


@lru_cache(maxsize=4096)
def _q(p: float, df: float | None) -> float:
    """Quantile of t on df degrees of freedom (normal beyond 1,000 or when unknown)."""
    if df is None or not math.isfinite(df) or df > 1000:
        return NormalDist().inv_cdf(p)
    return t_quantile(p, max(df, 1.0))


def mde(se: float, df: float | None, alpha: float) -> float:
    """Smallest true difference found with POWER by a two-sided test at level alpha."""
    return (_q(1 - alpha / 2, df) + _q(POWER, df)) * se


def bounds(c: Comparison) -> tuple[float, float]:
    """(low, high): the interval at the level the comparison was tested at; each end is a one-sided bound."""
    if c.ci_low_holm is not None and c.ci_high_holm is not None:
        return c.ci_low_holm, c.ci_high_holm
    h = _q(1 - _alpha(c) / 2, c.df) * c.se
    return c.estimate - h, c.estimate + h


def _alpha(c: Comparison) -> float:
    return c.alpha_holm if c.alpha_holm else ALPHA


def unit_parts(c: Comparison) -> tuple[float, float]:
    """(one seed's, one effective cluster's) variance: the record holds the estimate's seeds-only and
    clusters-only bootstrap variances at its own counts, each shrinking in proportion to its count."""
    return c.var_seed * c.n_seeds, c.var_cluster * c.n_clusters_eff


def _units(c: Comparison, n_s: float, n_c: float) -> float:
    vs, vc = unit_parts(c)
    return vs / n_s + vc / n_c


def design_se(c: Comparison, n_s: float, n_c: float) -> float:
    """The se at n_s seeds and n_c effective clusters: the reported se scaled by the variance model."""
    return c.se * math.sqrt(_units(c, n_s, n_c) / _units(c, c.n_seeds, c.n_clusters_eff))


def design_df(c: Comparison, n_s: float, n_c: float) -> float | None:
    """Welch-Satterthwaite degrees of freedom of the two components at the design, plus whatever the reported
    df had beyond today's (e.g. seed variance pooled over configurations)."""
    if c.df is None:
        return None

    def ws(ns: float, nc: float) -> float:
        vs, vc = unit_parts(c)
        a, b = vs / ns, vc / nc
        den = (a * a / (ns - 1) if ns > 1 else 0.0) + (b * b / (nc - 1) if nc > 1 else 0.0)
        return (a + b) ** 2 / den if den > 0 else math.inf

    extra = max(c.df - ws(c.n_seeds, c.n_clusters_eff), 0.0) if math.isfinite(c.df) else math.inf
    return ws(n_s, n_c) + extra


def powered(c: Comparison, n_s: float, n_c: float, effect: float) -> bool:
    return mde(design_se(c, n_s, n_c), design_df(c, n_s, n_c), _alpha(c)) <= effect


def plannable(c: Comparison) -> bool:
    need = (c.estimate, c.se, c.reference_effect, c.n_seeds, c.n_clusters_eff, c.var_seed, c.var_cluster)
    return all(v is not None for v in need) and c.se > 0 and c.reference_effect != 0 and c.n_seeds >= 1


class Pricer:
    """CPU-seconds of a design (n_seeds, item factor) for one comparison, from the study's price list."""

    def __init__(self, c: Comparison, costs: StudyCosts):
        self.c, self.costs = c, costs
        t = c.metric
        self.items = costs.items.get(t) or (costs.limits.get(t) or 0)
        limit = costs.limits.get(t)
        exhausted = limit is None or (t in costs.items and costs.items[t] < limit)
        self.why_capped = (
            "no eval group scores it as a task of its own"
            if t not in costs.limits
            else "the task is not sized by items"
            if not costs.sized_by_limit.get(t, True)
            else "the item pool is exhausted"
            if exhausted
            else "its evaluations record no time per item to price more"
            if t not in costs.item_s
            else ""
        )
        self.max_factor = 1.0 if self.why_capped else MAX_ITEM_FACTOR

    def items_at(self, factor: float) -> int:
        return math.ceil(self.items * factor - 1e-9)

    def cpu_s(self, n_s: int, factor: float) -> float:
        new = max(n_s - self.c.n_seeds, 0)
        items = self.items_at(factor)
        per_seed = self.costs.per_seed_s() + self.costs.more_items_per_seed_s(self.c.metric, items)
        reeval = self.costs.reeval_s(self.c.metric, items) if factor > 1 else 0.0
        return new * per_seed + reeval


def _factors(max_factor: float) -> list[float]:
    out, f = [1.0], 1.0
    while f * _STEP <= max_factor:
        f *= _STEP
        out.append(f)
    return out


def _min_factor(c: Comparison, n_s: int, effect: float, factors: list[float]) -> float | None:
    return next((f for f in factors if powered(c, n_s, c.n_clusters_eff * f, effect)), None)


def _option(c: Comparison, p: Pricer, n_s: int, f: float) -> dict:
    return {
        "n_seeds": n_s,
        "n_clusters_eff": round(c.n_clusters_eff * f, 1),
        "items": p.items_at(f) if f > 1 else p.items,
        "cpu_h": p.cpu_s(n_s, f) / 3600,
    }


def plan_target(c: Comparison, p: Pricer, effect: float) -> dict:
    """Seeds only, clusters only, and the cheapest mix that detect `effect` with POWER (None: not reachable);
    "met": this design already does."""
    if powered(c, c.n_seeds, c.n_clusters_eff, effect):
        return {"met": True, "seeds_only": None, "clusters_only": None, "cheapest": None}
    factors = _factors(p.max_factor)
    seeds = next((n for n in range(c.n_seeds, MAX_SEEDS + 1) if powered(c, n, c.n_clusters_eff, effect)), None)
    f = _min_factor(c, c.n_seeds, effect, factors)
    mixes = []
    for n in range(c.n_seeds, (seeds or MAX_SEEDS) + 1):
        fn = _min_factor(c, n, effect, factors)
        if fn is not None:
            mixes.append(_option(c, p, n, fn))
    best = min(mixes, key=lambda o: (o["cpu_h"], o["n_seeds"])) if mixes else None
    return {
        "met": False,
        "seeds_only": _option(c, p, seeds, 1.0) if seeds is not None else None,
        "clusters_only": _option(c, p, c.n_seeds, f) if f is not None else None,
        "cheapest": best,
    }


def token_trends(comparisons: list[Comparison]) -> dict[tuple, dict]:
    """Per (question, setting, method, metric) compared at >= 3 token budgets: the weighted least-squares slope
    of the estimate per doubling of tokens, its se, and whether the data support "more tokens widen the gap"."""
    groups: dict[tuple, list[tuple[float, float, float]]] = {}
    for c in comparisons:
        tok = _tokens(c.budget)
        if tok and c.estimate is not None and c.se:
            groups.setdefault(_key(c), []).append((math.log2(tok), c.estimate, c.se))
    out = {}
    for k, pts in groups.items():
        if len(pts) < 3:
            continue
        w = [1 / s**2 for *_, s in pts]
        sw = sum(w)
        mx = sum(wi * x for wi, (x, _, _) in zip(w, pts)) / sw
        my = sum(wi * y for wi, (_, y, _) in zip(w, pts)) / sw
        sxx = sum(wi * (x - mx) ** 2 for wi, (x, _, _) in zip(w, pts))
        if sxx <= 0:
            continue
        slope = sum(wi * (x - mx) * (y - my) for wi, (x, y, _) in zip(w, pts)) / sxx
        se = math.sqrt(1 / sxx)
        out[k] = {"slope_per_doubling": slope, "se": se, "budgets": len(pts), "supported": abs(slope / se) >= 2}
    return out


def _key(c: Comparison) -> tuple:
    return (c.question, c.setting, c.method, c.metric)


def _tokens(budget: str | None) -> int | None:
    if budget and budget.startswith("tok-"):
        try:
            return int(budget[4:])
        except ValueError:
            return None
    return None


def token_option(c: Comparison, trend: dict | None, m: float, costs: StudyCosts) -> dict:
    """Where the gap grows with tokens: the budget at which it would reach the MDE, and its training price."""
    tok = _tokens(c.budget)
    if trend is None or tok is None:
        return {"supported": False, "why": "fewer than 3 token budgets to fit a trend on"}
    if not trend["supported"]:
        return {"supported": False, "why": f"the gap shows no trend with tokens over {trend['budgets']} budgets"}
    slope = trend["slope_per_doubling"]
    if abs(c.estimate) >= m or slope * c.estimate < 0:
        return {"supported": False, "why": "the gap does not grow toward detectability with tokens"}
    doublings = (m - abs(c.estimate)) / abs(slope)
    factor = 2**doublings
    return {
        "supported": True,
        "tokens": int(round(tok * factor)),
        "slope_per_doubling": slope,
        "cpu_h": costs.train_per_seed_s() * c.n_seeds * factor / 3600,
    }


def whatif_rows(comparisons: list[Comparison], study_dir: Path) -> list[dict]:
    """One row per unresolved comparison: bounds, MDE, and the plans for TARGETS, priced from study_dir;
    row["index"] is the comparison's position in `comparisons` (to render it beside its verdict)."""
    costs = study_costs(Path(study_dir))
    trends = token_trends(comparisons)
    return [
        {"index": i, **_row(c, costs, trends.get(_key(c)))}
        for i, c in enumerate(comparisons)
        if c.verdict == "not resolved"
    ]


def _row(c: Comparison, costs: StudyCosts, trend: dict | None) -> dict:
    row = {
        k: getattr(c, k) for k in ("question", "setting", "method", "budget", "metric", "estimate", "reference_effect")
    }
    row["alpha"] = _alpha(c)
    if not plannable(c):
        return {**row, "plannable": False}
    ref = abs(c.reference_effect)
    lo, hi = bounds(c)
    m = mde(c.se, c.df, _alpha(c))
    p = Pricer(c, costs)
    return {
        **row,
        "plannable": True,
        "bound_low": lo,
        "bound_high": hi,
        "bound_low_pct": lo / ref,
        "bound_high_pct": hi / ref,
        "mde": m,
        "mde_pct": m / ref,
        "n_seeds": c.n_seeds,
        "n_clusters_eff": c.n_clusters_eff,
        "items": p.items,
        "items_capped": p.why_capped,
        "targets": [{"fraction": f, "effect": f * ref, **plan_target(c, p, f * ref)} for f in TARGETS],
        "tokens": token_option(c, trend, m, costs),
        "cores_known": costs.cores_known,
    }


def whatif_text(row: dict) -> str:
    """The row in sentences, for the report (one paragraph)."""
    where = f"{row['method']} vs full FT" + (f" at {row['budget']}" if row.get("budget") else "")
    if not row.get("plannable"):
        return f"{where}: not enough measured (se, variance parts, full FT's effect) to say what it would take."
    verb = "learning" if row["question"].startswith("learns") else "forgetting"
    out = [f"{where}: {_excluded(row, verb)}"]
    out.append(
        f"With 80% power at its Holm level (alpha {row['alpha']:.3g}) this design detects a difference of "
        f"{row['mde']:.3g} or more ({row['mde_pct']:.0%} of full FT's effect)."
    )
    for t in row["targets"]:
        out.append(f"To detect {t['fraction']:.0%} of full FT's effect ({t['effect']:.3g}): {_options(row, t)}.")
    tk = row["tokens"]
    if tk["supported"]:
        out.append(
            f"More tokens: the gap moves by {tk['slope_per_doubling']:+.3g} per doubling of the budget; at about "
            f"{tk['tokens']:,} tokens it would reach the detectable size ({tk['cpu_h']:.1f} CPU-h of training)."
        )
    else:
        out.append(f"More tokens: not a lever the data support here ({tk['why']}).")
    if not row["cores_known"]:
        out.append("CPU-hours count one core per job (the job log records no thread counts).")
    return " ".join(out)


def _excluded(row: dict, verb: str) -> str:
    lo, hi = row["bound_low_pct"], row["bound_high_pct"]
    less = f"more than {-lo:.0%} less" if lo < 0 else "less at all"
    more = f"more than {hi:.0%} more" if hi > 0 else "as much or more"
    return (
        f"the data exclude LoRA {verb} {less} than full FT, and {more} "
        f"(interval {row['bound_low']:+.3g} to {row['bound_high']:+.3g} on {row['metric']} at the level it was "
        f"tested at; full FT's own effect {abs(row['reference_effect']):.3g})."
    )


def _options(row: dict, t: dict) -> str:
    if t["met"]:
        return "this design already has 80% power for it"
    opts = []
    if s := t["seeds_only"]:
        opts.append(f"{s['n_seeds']} seeds (now {row['n_seeds']}), {s['cpu_h']:.1f} CPU-h")
    if c := t["clusters_only"]:
        opts.append(
            f"{c['items']} items, about {c['n_clusters_eff']:g} effective clusters (now {row['n_clusters_eff']:.1f}),"
            f" {c['cpu_h']:.1f} CPU-h"
        )
    b = t["cheapest"]
    if b and b not in (t["seeds_only"], t["clusters_only"]):
        opts.append(f"{b['n_seeds']} seeds and {b['items']} items, {b['cpu_h']:.1f} CPU-h")
    if not opts:
        return f"out of reach with up to {MAX_SEEDS} seeds" + (
            f" ({row['items_capped']})" if row["items_capped"] else f" and {MAX_ITEM_FACTOR:g}x the items"
        )
    tail = f" (more items cannot help: {row['items_capped']})" if row["items_capped"] else ""
    return "; or ".join(opts) + tail
