"""The paper's two questions for one setting, answered as tests on the test split; choices made on validation.

1. learns_less: at each budget, each LoRA method at its chosen learning rate against full fine-tuning at its
   own (the full-FT method best on validation if there are several); the test-split learning difference
   LoRA - full, per method, since rank and targets are where a capacity gap shows. One choice, one place: when
   the study ran an LR search for a method (STUDY/lr_search.json, made on the validation split), its chosen LR
   is used and only the main runs (runs.json role "main") answer the question; with a fixed LR list the report
   chooses on the validation split itself.
2. forgets_less_at_equal_learning: the matched-learning forgetting difference LoRA - full of the families'
   lower-left (Pareto) frontiers over all their points (learning rates, budgets, LR-search runs at their own budget too;
   seeds inside each point), see frontier.py.
Both are bootstrapped hierarchically (seeds x item clusters, bootstrap.py), Holm-corrected over every comparison
of the study (``settle``, all settings together), and decided by decide.py; "yes" means the paper's claim holds
(difference < 0).

Example::

    >>> a = answer(st, ps, L, F, "tokens", searched=study_choices(st, "code-cpt"))   # ps: the setting's points
    >>> settle([a])                                                                  # Holm over the study
    >>> [(v["question"], v["verdict"]) for v in a.verdicts]
    [('learns_less', 'yes'), ('forgets_less_at_equal_learning', 'not resolved')]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from lorascope.evals.catalog import MetricSpec

from ..errors import LorascopeError
from .bootstrap import noise_text, p_one_sided, p_two_sided, percentile_interval
from .decide import ALPHA, MARGIN_FRACTION, decide, holm, power_note
from .frontier import common_range, compared_forgetting, fit, matched_boot, matched_difference
from .measure import SplitMeasure, TestReplicates, measure_split

VAR_BOOT = 300  # replicates of the seeds-only / clusters-only bootstraps behind the power note
# Fewest test-split item clusters to test on. A raw percentile bootstrap over clusters covered 69% / 84% / 88% at
# 3 / 5 / 8 clusters (nominal 95%, 500 simulations, the tests' model); widened (bootstrap.small_sample_widen)
# 94% / 96% / 93%. Below 5 the bootstrap has too few distinct resamples to be more than a formality.
MIN_CLUSTERS = 5
MAIN = "main"  # runs.json role of a run that answers the questions; "lr-search" runs only chose an LR
STUDY_SEARCH = "the study's LR search (validation split)"
REPORT_CHOICE = "the report (validation split; fixed LR list)"


@dataclass
class Answer:
    verdicts: list[dict] = field(default_factory=list)
    chosen_lrs: dict = field(default_factory=dict)
    frontiers: dict = field(default_factory=dict)
    val: SplitMeasure | None = None
    rep: TestReplicates | None = None
    lr_choice: dict = field(default_factory=dict)  # method -> {"lr", "by", "bracketed", "status", "grid", ...}
    ps: list = field(default_factory=list)
    learning_p: dict = field(default_factory=dict)  # point index -> {"p", "p_holm"}: learning > 0 on test

    @property
    def test(self) -> SplitMeasure | None:
        return self.rep.both if self.rep else None


def study_choices(st, setting: str) -> dict[str, dict]:
    """The study's LR-search records of one setting (STUDY/lr_search.json), by method name; {} without one."""
    f = st.path / "lr_search.json"
    if not f.exists():
        return {}
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorascopeError(f"{f}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise LorascopeError(f"{f}: expected an object of 'setting/method' records")
    return {
        r["method"]: r for r in doc.values() if isinstance(r, dict) and r.get("setting") == setting and "method" in r
    }


def choose(ps: list, idx: list[int], val: SplitMeasure) -> dict[str, int]:
    """Per method name, the point (index) with the most validation learning among idx."""
    best: dict[str, int] = {}
    for i in idx:
        if i not in val.learning:
            continue
        m = ps[i].method
        if m not in best or val.learning[i] > val.learning[best[m]]:
            best[m] = i
    return best


def _same_lr(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)


def at_chosen(ps: list, idx: list[int], val: SplitMeasure, searched: dict) -> dict[str, int]:
    """Per method, its point at the chosen LR among idx: the study's choice for a searched method (never
    re-chosen here: one choice, one place), the most validation learning for a method with a fixed LR list."""
    out = choose(ps, [i for i in idx if ps[i].method not in searched], val)
    for i in idx:
        rec = searched.get(ps[i].method)
        if rec and _same_lr(ps[i].lr, rec.get("chosen")) and i in val.learning:
            out[ps[i].method] = i
    return out


def family_best(ps: list, per_method: dict[str, int], val: SplitMeasure) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in per_method.values():
        f = ps[i].family
        if f not in out or val.learning[i] > val.learning[out[f]]:
            out[f] = i
    return out


def lr_choices(ps: list, val: SplitMeasure, searched: dict, by: str) -> dict[str, dict]:
    """What chose each method's LR, for the headline: the study's search record, or the report's own choice on
    validation at the last budget (fixed lists). "bracketed": a worse LR was tested on both sides; "at": the
    budget (tokens or epochs, per `by`) the choice was made at (the LR-search runs' own, when they were shorter)."""
    out = {
        m: {
            "lr": r.get("chosen"),
            "by": STUDY_SEARCH,
            "bracketed": bool(r.get("bracketed")),
            "status": r.get("status"),
            "grid": list(r.get("grid") or []),
            "diverged": list(r.get("diverged") or []),
            "metric": r.get("metric"),
            "split": r.get("split"),
            "at": max((p.position(by) or 0 for p in ps if p.method == m and p.role != MAIN), default=None),
        }
        for m, r in searched.items()
    }
    main = [i for i, p in enumerate(ps) if p.role == MAIN and p.method not in searched]
    if not main:
        return out
    last = max((ps[i].position(by) or 0) for i in main)
    at_last = [i for i in main if (ps[i].position(by) or 0) == last]
    for m, i in choose(ps, [i for i in at_last if not ps[i].diverged], val).items():
        grid = sorted({ps[j].lr for j in at_last if ps[j].method == m and ps[j].lr is not None})
        inside = len(grid) >= 3 and grid[0] < ps[i].lr < grid[-1]
        out[m] = {
            "lr": ps[i].lr,
            "by": REPORT_CHOICE,
            "bracketed": inside,
            "status": "chosen" if inside else "unbracketed" if len(grid) > 1 else "only one tried",
            "grid": grid,
            "diverged": sorted({ps[j].lr for j in at_last if ps[j].method == m and ps[j].diverged}),
            "metric": None,
            "split": "validation",
            "at": last,
        }
    return out


def _verdict(question: str, a: str, b: str, budget, est, boot, reason: str, noise: str, **kw) -> dict:
    iv = percentile_interval(boot) if boot is not None and np.isfinite(boot).any() else None
    return {
        "question": question,
        "verdict": kw.pop("verdict", None),
        "estimate": est,
        "interval": iv,
        "level": 0.95,
        "reason": reason,
        "noise": noise,
        "split": "test",
        "a": a,
        "b": b,
        "budget": budget,
        "boot": boot,
        **kw,
    }


def learns_less(
    ps: list,
    val: SplitMeasure,
    rep: TestReplicates,
    by: str,
    noise: str,
    frac: float = MARGIN_FRACTION,
    searched: dict | None = None,
) -> list:
    """Question 1 at every budget of the main runs, each method at its chosen LR; the pending comparisons."""
    out, test, searched = [], rep.both, searched or {}
    main = [i for i, p in enumerate(ps) if p.role == MAIN and not p.diverged and i in test.learning]
    for b in sorted({ps[i].position(by) for i in main if ps[i].position(by) is not None}):
        per = at_chosen(ps, [i for i in main if ps[i].position(by) == b], val, searched)
        j = family_best(ps, per, val).get("full")
        if j is None:
            continue
        for i in sorted(i for i in per.values() if ps[i].family != "full"):
            est = test.learning[i] - test.learning[j]
            d = rep.of(lambda m, i=i, j=j: m.boot_learning[i] - m.boot_learning[j], est, _seeds(ps, [i, j]))
            gains = [test.learning[i], test.learning[j]]
            lows = [percentile_interval(rep.arm("learning", k))[0] for k in (i, j)]
            v = _verdict(
                "learns_less",
                ps[i].name,
                ps[j].name,
                b,
                est,
                d,
                "",
                noise,
                margin=frac * max(gains),
                points=(i, j),
                capacity=(ps[i].capacity, ps[j].capacity),
            )
            if max(lows) <= 0:
                v.update(
                    verdict="not comparable",
                    reason=f"nothing learned: neither {ps[i].name} nor {ps[j].name} "
                    "improved on the base model significantly on the test split",
                )
            out.append(v)
    return out


def forgets_less(ps: list, rep: TestReplicates, noise: str, frac: float = MARGIN_FRACTION) -> tuple[list, dict]:
    """Question 2 per LoRA family against full FT, and the frontiers for the Pareto figure (every point, the
    LR-search runs' included: each is a (method, LR, budget) configuration measured on the test split)."""
    test = rep.both
    fams: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        if not p.diverged and i in test.learning and i in test.forgetting:
            fams.setdefault(p.family, []).append(i)
    pts = {f: [(test.learning[i], test.forgetting[i]) for i in idx] for f, idx in fams.items()}
    frontiers = {
        f: {
            "points": [(test.learning[i], test.forgetting[i], ps[i].name) for i in idx],
            "capacity": [ps[i].capacity for i in idx],
            "curve": fit(pts[f]),
            "band": None,
        }
        for f, idx in fams.items()
    }
    out = []
    for f, idx in fams.items():
        if f == "full" or "full" not in fams:
            continue
        j = fams["full"]
        rng = common_range(pts[f], pts["full"])
        frontiers[f]["band"] = rng
        frontiers["full"]["band"] = frontiers["full"]["band"] or rng
        v = _verdict(
            "forgets_less_at_equal_learning", f, "full", None, None, None, "", noise, points=(idx, j), range=rng
        )
        if rng is None:
            v.update(
                verdict="not comparable",
                reason=f"the learning ranges of {f} and full fine-tuning do not "
                "overlap on the test split, so there is no equal-learning level to compare at",
            )
        elif rng[1] <= 0:
            v.update(
                verdict="not comparable",
                reason="nothing learned: the common learning range lies at or below the base model",
            )
        else:
            est = matched_difference(pts[f], pts["full"])
            boot = rep.of(lambda m, idx=idx, j=j: _matched(m, idx, j), est, _seeds(ps, idx + j))
            top = compared_forgetting(pts[f], pts["full"])
            v.update(
                estimate=est,
                boot=boot,
                interval=percentile_interval(boot),
                margin=frac * top,
                undefined=float(np.mean(~np.isfinite(boot))),
            )
        out.append(v)
    return out, frontiers


def _seeds(ps: list, idx: list[int]) -> int:
    """Seeds behind a statistic of several points: the fewest any of them has."""
    return min(len(ps[i].run_ids) for i in idx)


def _matched(m: SplitMeasure, ia: list[int], ib: list[int]) -> np.ndarray:
    stack = lambda d, idx: np.stack([d[i] for i in idx], axis=1)  # noqa: E731 - (B, n points)
    return matched_boot(
        stack(m.boot_learning, ia),
        stack(m.boot_forgetting, ia),
        stack(m.boot_learning, ib),
        stack(m.boot_forgetting, ib),
    )


def answer(
    st,
    ps: list,
    L: MetricSpec,
    F: MetricSpec | None,
    by: str,
    margin_fraction: float = MARGIN_FRACTION,
    n_boot: int = 1000,
    searched: dict | None = None,
) -> Answer:
    """Both questions for one setting's points; the tested comparisons stay pending (verdict None, with their
    replicates) until ``settle`` decides them with Holm's correction over the whole study."""
    searched = searched or {}
    val = measure_split(st, ps, L, F, "validation", n_boot)
    rep = TestReplicates.make(st, ps, L, F, n_boot, VAR_BOOT)
    if val is None or rep is None:
        return Answer(val=val, rep=rep, ps=ps)
    noise = noise_text(rep.both.n_seeds, rep.both.tables[:1], n_boot)
    lr_choice = lr_choices(ps, val, searched, by)
    q1 = learns_less(ps, val, rep, by, noise, margin_fraction, searched)
    q2, frontiers = forgets_less(ps, rep, noise, margin_fraction) if F is not None else ([], {})
    vs = q1 + q2
    few = _too_few(rep.both)
    for v in vs:
        if v["verdict"] is None and few:
            v.update(verdict="not resolved", reason=few)
        if v["verdict"] is None:
            v["p"] = p_two_sided(v["boot"])
    chosen = {m: c["lr"] for m, c in lr_choice.items() if c["lr"] is not None}
    return Answer(vs, chosen, frontiers, val, rep, lr_choice, ps)


def settle(answers: list[Answer]) -> int:
    """Decide every pending comparison of the study with Holm's correction over all of them (every setting and
    question: the family-wise error of the whole report); returns the number of comparisons corrected over."""
    pending = [(a, v) for a in answers for v in a.verdicts if v["verdict"] is None]
    k = len(pending)
    for (a, v), pa in zip(pending, holm([v["p"] for _, v in pending])):
        v["verdict"], v["reason"] = decide(v["estimate"], v["boot"], pa, v["margin"], -1, v["p"], k)
        v["p_holm"] = pa  # sign -1: the paper's direction, LoRA learns less / forgets less
        v["correction"] = f"Holm over the {k} comparison{'s' * (k != 1)} of the study (all settings)"
        if v["verdict"] == "not resolved":
            v["power"] = _power(a.rep, v, a.ps)
    for a in answers:
        for v in a.verdicts:
            v.pop("boot", None)
            v.pop("points", None)
    return k


def learning_tests(cands: list[tuple[Answer, list[int]]]) -> int:
    """One-sided test "learning over the base > 0" on the test split for every candidate point of a
    recommendation, Holm-corrected over all candidates of the study; fills Answer.learning_p. Returns the count."""
    flat = []
    for a, idx in cands:
        for i in idx:
            if a.test is not None and i in a.test.learning:
                flat.append((a, i, p_one_sided(a.rep.arm("learning", i))))
    for (a, i, p), pa in zip(flat, holm([p for *_, p in flat])):
        a.learning_p[i] = {"p": p, "p_holm": pa}
    return len(flat)


def _too_few(test: SplitMeasure) -> str:
    """Why the test split is too small to test on ("" when it is not)."""
    n = min(len(t.clusters) for t in test.tables)
    if n >= MIN_CLUSTERS:
        return ""
    return (
        f"only {n} item cluster{'s' * (n != 1)} on the test split of a compared task; an interval needs at "
        f"least {MIN_CLUSTERS} (raise the evaluation limit)"
    )


def _power(rep: TestReplicates, v: dict, ps: list) -> str:
    """The power note of one unresolved comparison, from seeds-only and clusters-only bootstraps."""
    i, j = v["points"]
    if v["question"] == "learns_less":
        vs, vc = rep.variances(lambda m: m.boot_learning[i] - m.boot_learning[j])
        n_seeds = _seeds(ps, [i, j])
    else:
        vs, vc = rep.variances(lambda m: _matched(m, i, j))
        n_seeds = _seeds(ps, i + j)
    return power_note(v["estimate"], vs, vc, n_seeds, rep.n_clusters, v.get("margin"))


def candidates(ps: list, fin: list[int], a: Answer) -> list[int]:
    """The points a recommendation may pick: final main runs (an LR-search run only chose an LR), not diverged,
    measured on both splits."""
    if a.test is None or a.val is None:
        return []
    return [
        i for i in fin if ps[i].role == MAIN and not ps[i].diverged and i in a.test.learning and i in a.val.learning
    ]


def recommend(
    ps: list, fin: list[int], a: Answer, L: MetricSpec, frac: float = MARGIN_FRACTION, setting: str = ""
) -> tuple[int | None, list[str]]:
    """(point index or None, sentences). Only points whose test-split learning over the base is significantly
    positive (one-sided, Holm-corrected over the study's candidates: learning_tests) qualify; among them the
    choice reads validation: the least validation forgetting among those within the margin of the best
    validation learning. Without a qualifier, what to change instead."""
    val, test = a.val, a.test
    if few := _too_few(test):
        return None, [f"No recommendation for {setting}: {few}."]
    cands = [i for i in candidates(ps, fin, a) if a.learning_p.get(i, {}).get("p_holm", 1.0) < ALPHA]
    if not cands:
        return None, advice(ps, fin, a, L)
    top = max(val.learning[i] for i in cands)
    near = [i for i in cands if val.learning[i] >= top - frac * abs(top)]
    pick = (
        min(near, key=lambda i: val.forgetting.get(i, np.inf))
        if val.forgetting
        else max(near, key=lambda i: val.learning[i])
    )
    lo, hi = percentile_interval(a.rep.arm("learning", pick))
    why = (
        f"its learning over the base model is significantly positive on the test split ({test.learning[pick]:+.4g} "
        f"[{lo:+.4g}, {hi:+.4g}], one-sided Holm-adjusted p = {a.learning_p[pick]['p_holm']:.3g})"
    )
    if len(near) > 1:
        why += (
            f", and among the {len(near)} configurations within {frac:.0%} of the best validation learning it "
            "forgets the least on the validation split"
        )
    else:
        why += ", and it learned the most on the validation split"
    caveat = edge_caveat(a.lr_choice.get(ps[pick].method))
    return pick, [f"Recommended for {setting}: {ps[pick].name} — {why}."] + caveat


def edge_caveat(choice: dict | None) -> list[str]:
    """A sentence when the recommended LR is the best of its grid but sits at the grid's edge."""
    grid = sorted((choice or {}).get("grid") or [])
    lr = (choice or {}).get("lr")
    if lr is None or len(grid) < 2 or choice.get("bracketed"):
        return []
    low = lr <= grid[0]
    return [
        f"Caveat: its learning rate {lr:g} is the {'lowest' if low else 'highest'} of those tried "
        f"({', '.join(f'{g:g}' for g in grid)}), so a {'lower' if low else 'higher'} one may learn more; widen "
        "the search (lrs: {auto: {max_extensions: ...}}) before settling on it."
    ]


def advice(ps: list, fin: list[int], a: Answer, L: MetricSpec) -> list[str]:
    """What to change when nothing qualifies for a recommendation (learning rate, budget, data)."""
    test = a.test
    out = [
        f"No recommendation: no configuration improved {L.task} significantly over the base model on the "
        "test split (one-sided test, Holm-corrected over the study's configurations), so none is recommended."
    ]
    div = [ps[i].name for i in fin if ps[i].diverged]
    if div:
        out.append(f"Diverged: {', '.join(div)}; lower their learning rates.")
    tried = [i for i in fin if i in test.learning and not ps[i].diverged]
    if not tried:
        return out
    if all(test.learning[i] < 0 for i in tried):
        low = {}
        for i in tried:
            low[ps[i].method] = min(low.get(ps[i].method, np.inf), ps[i].lr if ps[i].lr is not None else np.inf)
        lows = ", ".join(f"{m} {lr:g}" for m, lr in sorted(low.items()) if np.isfinite(lr))
        out.append(
            f"Every configuration made {L.task} worse than the base model: try learning rates below the "
            f"lowest tried ({lows}), and check that the training data matches the target domain."
        )
        return out
    top = [
        f"{m} ({c['lr']:g})"
        for m, c in sorted(a.lr_choice.items())
        if c["lr"] is not None and not c["bracketed"] and len(c["grid"]) > 1 and _same_lr(c["lr"], max(c["grid"]))
    ]
    out.append(
        "The gains are within noise: train on more tokens or evaluate more items and seeds"
        + (f"; the chosen learning rate is the largest tried for {', '.join(top)}: try larger ones." if top else ".")
    )
    return out
