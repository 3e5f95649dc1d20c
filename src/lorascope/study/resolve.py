"""``lorascope study STUDY_DIR --resolve [--budget 2h] [--dry-run]``: the next step for unresolved verdicts.

From the study's unresolved comparisons (``lorascope.report.verdicts``) and its own job log
(``report.jobcosts``), choose what buys the most precision per CPU-second, within the budget:

- **another seed** of every main configuration (new main runs; every comparison gets n_seeds + 1),
- **more items**: an eval group's ``limit`` doubled (the selection is nested, so the old items stay; the group is
  evaluated again on the main runs and the base model, no retraining; the LR search keeps its evaluations, so
  its choice stands),
- **a longer budget**: the setting's tokens doubled (every main run retrained, the old budget kept as a
  checkpoint), offered only where the gap grows with tokens across >= 3 budgets (``whatif.token_trends``).

Precision is counted per comparison as the relative gain in 1/se^2 (so questions in other units weigh alike),
from the variance model ``se^2 ~ var_seed/n_seeds + var_cluster/n_eff``; steps are added greedily, the best
gain per CPU-second first, while the plan's estimated wall time (CPU-seconds / --jobs) fits the budget. The
change is written into STUDY_DIR/study.yaml (so a re-run continues it), run by the normal scheduler, and
reported again.

Repeated looks: at most MAX_LOOKS (the study as first run is look 1), each tested at the level of
O'Brien-Fleming-type alpha spending (``spending.py``). STUDY_DIR/resolve.json records every look, its plan and
its level; the report tests the look's comparisons at ``alpha_level`` (Holm inside it) and states the look.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorascope.config import dump
from lorascope.errors import LorascopeError
from lorascope.fileio import atomic_write_json, atomic_write_text
from lorascope.report.jobcosts import StudyCosts, study_costs
from lorascope.report.records import Comparison
from lorascope.report.whatif import MAX_ITEM_FACTOR, MAX_SEEDS, Pricer, token_trends
from lorascope.study.config import StudyConfig, load_study
from lorascope.study.spending import nominal_alpha, spent

MAX_LOOKS = 3
ALPHA = 0.05
STATE = "resolve.json"
MIN_GAIN = 0.05  # a step must raise the plan's precision by 5% at least: no budget spent on crumbs
SUPERSEDED = "superseded"  # evaluations replaced by a larger limit are moved here, not deleted


@dataclass
class Plan:
    seeds: int = 0  # seeds added to every main configuration
    factors: dict[int, float] = field(default_factory=dict)  # eval group index -> item multiplier
    tokens: float = 1.0  # token budget multiplier (1: unchanged)
    steps: list[str] = field(default_factory=list)

    def copy(self) -> Plan:
        return Plan(self.seeds, dict(self.factors), self.tokens, list(self.steps))


def parse_budget(text: str) -> float:
    """'2h', '90m', '1.5h', '3600s' or '3600' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([hms]?)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise LorascopeError(f"--budget: '{text}' is not a duration (e.g. 2h, 90m, 3600s)")
    return float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]


def load_comparisons(d: Path) -> list[Comparison]:
    """The study's verdict records, computed by the report without rendering."""
    from lorascope import report

    fn = getattr(report, "verdicts", None)
    if fn is None:
        raise LorascopeError(f"{d}: --resolve needs the report's verdict records (lorascope.report.verdicts)")
    return list(fn(d))


def _group_of(study: StudyConfig, task: str) -> int | None:
    return next((i for i, g in enumerate(study.evals.groups) if task in g.tasks), None)


class Chooser:
    """Prices and values plans for the unresolved comparisons of one study."""

    def __init__(self, study: StudyConfig, comps: list[Comparison], costs: StudyCosts):
        self.study, self.costs = study, costs
        self.comps = [c for c in comps if _usable(c)]
        self.pricers = {id(c): Pricer(c, costs) for c in self.comps}
        trends = token_trends(comps)
        key = lambda c: (c.question, c.setting, c.method, c.metric)  # noqa: E731
        self.growth = {id(c): trends.get(key(c)) for c in self.comps}

    def gain(self, p: Plan) -> float:
        """Sum over comparisons of the relative gain in 1/se^2 (0 for today's design)."""
        total = 0.0
        for c in self.comps:
            g = _group_of(self.study, c.metric)
            f = min(p.factors.get(g, 1.0), self.pricers[id(c)].max_factor) if g is not None else 1.0
            units = c.var_seed / (c.n_seeds + p.seeds) + c.var_cluster / (c.n_clusters_eff * f)
            now = c.var_seed / c.n_seeds + c.var_cluster / c.n_clusters_eff
            total += now / units * self._signal(c, p.tokens) - 1.0
        return total

    def _signal(self, c: Comparison, tokens: float) -> float:
        """(projected |gap| / |gap|)^2 at `tokens` x the budget, where the data show a trend (else 1)."""
        t = self.growth.get(id(c))
        if tokens <= 1 or not t or not t["supported"] or not c.estimate or t["slope_per_doubling"] * c.estimate < 0:
            return 1.0
        return ((abs(c.estimate) + abs(t["slope_per_doubling"]) * math.log2(tokens)) / abs(c.estimate)) ** 2

    def cost_s(self, p: Plan) -> float:
        """CPU-seconds of a plan: new seeds (at the new item counts and budget), re-evaluations, retraining."""
        co, per_seed, reeval = self.costs, self.costs.per_seed_s(), 0.0
        for g, f in p.factors.items():
            for t in self.study.evals.groups[g].tasks:
                items = math.ceil(co.items.get(t, 0) * f)
                per_seed += co.more_items_per_seed_s(t, items)
                reeval += co.reeval_s(t, items)
        retrain = 0.0
        if p.tokens > 1:
            per_seed += co.train_per_seed_s() * (p.tokens - 1)
            n_now = max((len(r) for r in co.configs.values()), default=0)
            retrain = co.train_per_seed_s() * p.tokens * n_now
        return p.seeds * per_seed + reeval + retrain

    def moves(self, p: Plan) -> list[Plan]:
        out = []
        if max((c.n_seeds for c in self.comps), default=0) + p.seeds < MAX_SEEDS:
            out.append(_with(p, "another seed", seeds=p.seeds + 1))
        for g in sorted({_group_of(self.study, c.metric) for c in self.comps} - {None}):
            cap = max(self.pricers[id(c)].max_factor for c in self.comps if _group_of(self.study, c.metric) == g)
            f = p.factors.get(g, 1.0) * 2
            if f <= min(cap, MAX_ITEM_FACTOR):
                out.append(_with(p, f"items of eval group {g} x2", factors={**p.factors, g: f}))
        if p.tokens == 1 and any(self._signal(c, 2.0) > 1 for c in self.comps) and _tokens_ok(self.study):
            out.append(_with(p, "token budget x2", tokens=2.0))
        return out

    def choose(self, budget_s: float, jobs: int) -> Plan:
        """Greedy: add the move with the most gain per CPU-second while the plan's wall time fits the budget."""
        plan = Plan()
        while True:
            base_gain, base_cost = self.gain(plan), self.cost_s(plan)
            best, best_rate = None, 0.0
            for m in self.moves(plan):
                cost = self.cost_s(m)
                if cost / max(jobs, 1) > budget_s:
                    continue
                added = self.gain(m) - base_gain
                rate = added / max(cost - base_cost, 1e-9)
                if added >= MIN_GAIN * (base_gain + len(self.comps)) and rate > best_rate:
                    best, best_rate = m, rate
            if best is None:
                return plan
            plan = best


def _with(p: Plan, step: str, **kw) -> Plan:
    q = p.copy()
    for k, v in kw.items():
        setattr(q, k, v)
    q.steps.append(step)
    return q


def _usable(c: Comparison) -> bool:
    need = (c.se, c.n_seeds, c.n_clusters_eff, c.var_seed, c.var_cluster)
    return c.verdict == "not resolved" and all(v is not None for v in need) and c.n_seeds >= 1 and c.n_clusters_eff > 0


def _tokens_ok(study: StudyConfig) -> bool:
    return all(not s.separate_runs and s.train.max_tokens and s.train.epochs is None for s in study.settings)


# ---------------------------------------------------------------------------------------------------------
# looks, the plan's text, and carrying it out


def read_state(d: Path) -> dict:
    f = d / STATE
    if not f.exists():
        return {"alpha": ALPHA, "max_looks": MAX_LOOKS, "spending": "Lan-DeMets, O'Brien-Fleming type", "looks": []}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorascopeError(f"{f}: not valid JSON ({e.msg})") from None


def look_record(look: int, state: dict) -> dict:
    """Look `look`'s levels: the two-sided alpha its tests use, and the cumulative alpha spent by it."""
    a, k = state["alpha"], state["max_looks"]
    return {"look": look, "alpha_level": nominal_alpha(look, k, a), "alpha_spent": spent(look / k, a)}


def describe(plan: Plan, ch: Chooser, jobs: int, look: int, state: dict) -> str:
    cpu = ch.cost_s(plan)
    lr = look_record(look, state)
    head = f"look {look} of at most {state['max_looks']}: tests at alpha {lr['alpha_level']:.3g} (two-sided)"
    if not plan.steps:
        return f"{head}\nno step fits the budget (or none would add precision): nothing to run"
    steps = ", ".join(f"{s} ({n})" for s, n in _counted(plan.steps))
    return (
        f"{head}\nplan: {steps}\n"
        f"precision: 1/se^2 up {ch.gain(plan) / max(len(ch.comps), 1):+.0%} on average over "
        f"{len(ch.comps)} unresolved comparison(s)\n"
        f"cost: {cpu / 3600:.2f} CPU-h, about {cpu / max(jobs, 1) / 60:.0f} min at --jobs {jobs} "
        "(from the study's job log)"
    )


def _counted(steps: list[str]) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for s in steps:
        out[s] = out.get(s, 0) + 1
    return list(out.items())


def apply(plan: Plan, study: StudyConfig, d: Path, look: int) -> StudyConfig:
    """Write the plan into d/study.yaml and move aside the evaluations a larger limit replaces."""
    from lorascope.study.config import search_seed

    data = dump(study)
    taken = set(study.seeds) | {search_seed(study)}
    for _ in range(plan.seeds):
        nxt = max(taken) + 1
        while nxt in taken:
            nxt += 1
        data["seeds"].append(nxt)
        taken.add(nxt)
    for g, f in plan.factors.items():
        data["evals"]["groups"][g]["limit"] = math.ceil(study.evals.groups[g].limit * f)
    if plan.tokens > 1:
        for s in data["settings"]:
            old = s["train"]["max_tokens"]
            s["train"]["checkpoints"] = [*s["train"]["checkpoints"], old]
            s["train"]["max_tokens"] = int(old * plan.tokens)
    new = StudyConfig.model_validate(data)
    for g in plan.factors:
        _supersede(d, g, look)
    atomic_write_text(d / "study.yaml", yaml.safe_dump(dump(new), sort_keys=False))
    return new


def _supersede(d: Path, group: int, look: int) -> None:
    """Evaluations of the main runs and the base model that ran `group` are redone at the new limit; the old
    files go to d/superseded/look<k>/. LR-search runs keep theirs: their choice was made and stands."""
    runs = json.loads((d / "runs.json").read_text(encoding="utf-8"))
    main = {r["run_id"] for r in runs if r.get("role", "main") == "main"}
    dirs = [d / "evals" / "base"] + [p.parent for p in sorted((d / "evals").glob("*/*/results.json"))]
    for ev in dirs:
        if ev.parent.name != "evals" and ev.parent.name not in main:
            continue
        if not (ev / "groups" / str(group)).exists():
            continue
        dest = d / SUPERSEDED / f"look{look}" / ev.relative_to(d)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(ev / "groups" / str(group)), dest / "groups" / str(group))
        if (ev / "results.json").exists():
            shutil.move(str(ev / "results.json"), dest / "results.json")


def resolve_study(
    d: Path,
    budget_s: float,
    jobs: int = 1,
    executor: str = "local",
    dry_run: bool = False,
    executor_opts: dict | None = None,
    comparisons: list[Comparison] | None = None,
    progress: bool = True,
) -> str:
    """Choose, write, run and report the next step of the study in d; returns the plan's text."""
    d = Path(d)
    if not (d / "study.yaml").exists():
        raise LorascopeError(f"{d}: not a study directory (no study.yaml)")
    state = read_state(d)
    last = state["looks"][-1] if state["looks"] else None
    if last and last.get("status") == "running":
        return _continue(d, state, jobs, executor, executor_opts, progress, dry_run)
    look = len(state["looks"]) + 1 if state["looks"] else 2  # the study as first run was look 1
    if look > state["max_looks"]:
        raise LorascopeError(f"{d / STATE}: all {state['max_looks']} looks are spent; the verdicts stand")
    study = load_study(d / "study.yaml")
    comps = load_comparisons(d) if comparisons is None else comparisons
    ch = Chooser(study, comps, study_costs(d))
    plan = ch.choose(budget_s, jobs)
    text = describe(plan, ch, jobs, look, state)
    if dry_run or not plan.steps:
        return text
    if not state["looks"]:
        state["looks"].append({**look_record(1, state), "status": "done", "plan": None})
    apply(plan, study, d, look)
    state["looks"].append(
        {
            **look_record(look, state),
            "status": "running",
            "plan": {"seeds": plan.seeds, "factors": plan.factors, "tokens": plan.tokens, "steps": plan.steps},
            "cpu_h_planned": ch.cost_s(plan) / 3600,
            "unresolved": len(ch.comps),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    atomic_write_json(d / STATE, state)
    return text + "\n" + _continue(d, state, jobs, executor, executor_opts, progress, False)


def _continue(d: Path, state: dict, jobs, executor, opts, progress: bool, dry_run: bool) -> str:
    """Run the current look's study to the end and report it (again, after an interruption)."""
    look = state["looks"][-1]
    if dry_run:
        return f"look {look['look']} is under way: run without --dry-run to continue it"
    from lorascope.report import write_report
    from lorascope.study.scheduler import run_study

    run_study(d / "study.yaml", [], d, jobs=jobs, executor=executor, executor_opts=opts, progress=progress)
    look.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(d / STATE, state)
    return f"look {look['look']} done: {write_report(d)}"
