"""Points (configuration x checkpoint, averaged over seeds), their learning and forgetting against the base and
against full fine-tuning, and the recommendation sentence of each setting.

A *curve* is one configuration of a setting: (method name, learning rate); its *points* are its checkpoints
(or, with separate runs per budget, the final checkpoints of those runs). Seeds of one point are pooled.

Example::

    >>> st = load_study_dir(Path("studies/quick")); rows = metric_rows(st)
    >>> for h in headlines(st, rows): print(h.setting, h.recommended.name, h.sentences[0])
    code-cpt lora-r64 lr=0.0002 lora-r64 lr=0.0002 learned the most: ...
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .collect import BASE, Study
from .metrics import MetricSpec, describe, forgetting_metric, learning_metric, signed, spec
from .stats import Interval, item_values, paired_bootstrap, seed_spread, stderr_interval


@dataclass
class Point:
    setting: str
    method: str
    family: str
    lr: float | None
    checkpoint: str
    tokens: int | None
    epoch: int | None
    run_ids: list[str]
    labels: list[str]
    diverged: bool = False
    # (task, metric) -> (mean over seeds, mean stderr, seed sd or None)
    values: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method} lr={self.lr:g}" if self.lr is not None else self.method

    def position(self, by: str) -> float | None:
        return self.epoch if by == "epoch" else self.tokens


def points(st: Study, rows: list[dict]) -> list[Point]:
    """Every (setting, method, lr, checkpoint) with eval rows, seeds pooled; truncations excluded."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["run_id"] != BASE and not r["checkpoint"].startswith("truncate-"):
            grouped[(r["setting"], r["method"], r["lr"], r["checkpoint"])].append(r)
    out = []
    for (setting, method, lr, ck), rs in grouped.items():
        run_ids = sorted({r["run_id"] for r in rs})
        runs = [st.run(i) for i in run_ids]
        p = Point(setting, method, runs[0]["family"], lr, ck, rs[0]["tokens"], rs[0]["epoch"], run_ids,
                  [r["label"] for r in runs], diverged=any(r["diverged"] for r in runs))
        by_metric: dict[tuple, list[dict]] = defaultdict(list)
        for r in rs:
            by_metric[(r["task"], r["metric"])].append(r)
        for key, ms in by_metric.items():
            vals = [m["value"] for m in ms]
            ses = [m["stderr"] for m in ms if m["stderr"] is not None]
            p.values[key] = (sum(vals) / len(vals), sum(ses) / len(ses) if ses else None, seed_spread(vals))
        out.append(p)
    return sorted(out, key=lambda p: (p.setting, p.method, p.lr or 0, p.tokens or 0, p.epoch or 0))


def axis(ps: list[Point]) -> str:
    """IFT settings trained by epochs are plotted against epochs, everything else against tokens."""
    return "epoch" if ps and all(p.epoch is not None for p in ps) else "tokens"


def finals(ps: list[Point]) -> list[Point]:
    """The last point of every curve of a setting."""
    by = axis(ps)
    last: dict[tuple, Point] = {}
    for p in ps:
        k = (p.method, p.lr)
        if k not in last or (p.position(by) or 0) > (last[k].position(by) or 0):
            last[k] = p
    return list(last.values())


def base_values(rows: list[dict]) -> dict:
    return {(r["task"], r["metric"]): (r["value"], r["stderr"]) for r in rows if r["run_id"] == BASE}


def difference(st: Study, s: MetricSpec, a: Point, b: Point | None, base: dict) -> Interval | None:
    """Signed (learning or forgetting, per s.role) difference of a over b (b None = the base model)."""
    key = (s.task, s.metric)
    if key not in a.values or (b is not None and key not in b.values) or (b is None and key not in base):
        return None
    ia = [item_values(st, r, a.checkpoint, s) for r in a.run_ids]
    ib = [item_values(st, BASE, None, s)] if b is None else [item_values(st, r, b.checkpoint, s) for r in b.run_ids]
    iv = None
    if all(ia) and all(ib):
        iv = paired_bootstrap(ia, ib)
    if iv is None:
        va, sa, _ = a.values[key]
        vb, sb = base[key] if b is None else b.values[key][:2]
        iv = stderr_interval(va, sa, vb, sb)
    if iv is None:
        return None
    positive = signed(s, 1.0, 0.0) > 0  # does a raw increase count as more learning/forgetting?
    return iv if positive else iv.flipped()


def _sig(iv: Interval | None) -> str:
    if iv is None:
        return "no interval (no stderr or samples)"
    return "significant" if iv.significant else "not significant (95% CI includes 0)"


@dataclass
class Headline:
    setting: str
    learning: MetricSpec | None
    forgetting: MetricSpec | None
    table: list[dict]  # one row per configuration at its last checkpoint
    sentences: list[str]
    recommended: Point | None = None


def headline(st: Study, ps: list[Point], rows: list[dict], setting: str, dataset: str | None) -> Headline:
    base = base_values(rows)
    fin = [p for p in finals([p for p in ps if p.setting == setting])]
    if not base:
        return Headline(setting, None, None, [], ["Not run: the base model was not evaluated, so learning and "
                                                   "forgetting cannot be measured against it."])
    tasks = sorted({t for p in fin for (t, _) in p.values} & {t for (t, _) in base})
    pick = {"learning": learning_metric(tasks, dataset), "forgetting": forgetting_metric(tasks)}
    out: list[str] = []
    for role, want in (st.config.get("report") or {}).items():
        if not want or want == pick.get(role):
            continue
        if want in tasks and spec(want) is not None:
            pick[role] = want
        else:  # said out loud, never a silent substitute
            out.append(f"report.{role} asks for {want}, which was not evaluated on both the base model and "
                       f"the runs of this setting (or has no known headline metric); {pick[role]} is used.")
    ls, fs = pick["learning"], pick["forgetting"]
    L, F = (spec(ls) if ls else None), (spec(fs) if fs else None)
    table = []
    for p in fin:
        row = {"point": p, "learning": difference(st, L, p, None, base) if L else None,
               "forgetting": difference(st, F, p, None, base) if F else None}
        table.append(row)
    if L is None:
        return Headline(setting, L, F, table, ["Not run: no learning task (domain benchmark or held-out BPB) was "
                                              "evaluated on both the base model and the runs of this setting."])
    out.append(f"Learning is {describe(L)}" + (f"; forgetting is {describe(F)}" if F else
                                               "; no forgetting task was evaluated") +
               ", each at the configuration's last checkpoint against the base model.")
    ok = [r for r in table if r["learning"] is not None and not r["point"].diverged]
    for r in table:
        if r["point"].diverged:
            out.append(f"{r['point'].name} diverged and is left out of the recommendation.")
    if not ok:
        out.append("No configuration has a learning measurement to compare.")
        return Headline(setting, L, F, table, out)
    best = max(ok, key=lambda r: r["learning"].estimate)
    bp = best["point"]
    f_txt = f", forgetting {best['forgetting'].text()}" if best["forgetting"] else ""
    out.append(f"{bp.name} learned the most: learning {best['learning'].text()}{f_txt}.")
    if not best["learning"].significant:
        out.append(f"No configuration improved {L.task} significantly over the base model: the gain of {bp.name} "
                   f"is not significant (95% CI includes 0).")
    ties = [best]
    for r in ok:
        if r is best:
            continue
        d = difference(st, L, r["point"], bp, base)
        if d is not None and not d.significant:
            ties.append(r)
            out.append(f"The difference in learning between {bp.name} and {r['point'].name} is not significant "
                       f"({d.text()}, 95% CI includes 0).")
    rec = min(ties, key=lambda r: r["forgetting"].estimate if r["forgetting"] else float("inf")) if F else best
    rp = rec["point"]
    if rec is best:
        why = "no other configuration comes within noise of its learning" if len(ties) == 1 else \
            "it forgets the least among the configurations that learn as much"
    else:
        d = difference(st, F, rp, bp, base)
        why = (f"it learns as much as {bp.name} within noise and forgets less "
               f"(forgetting difference {d.text() if d else 'n/a'}, {_sig(d)})")
    out.append(f"Recommended for {setting}: {rp.name} — {why}.")
    out += _lora_vs_full(st, ok, L, F, base)
    few = min((r[k].n for r in ok for k in ("learning", "forgetting") if r[k] and r[k].n), default=None)
    if few is not None and few < 30:
        out.append(f"Caution: some intervals rest on only {few} evaluation items; raise the eval limit for "
                   "firmer conclusions.")
    return Headline(setting, L, F, table, out, recommended=rp)


def _lora_vs_full(st: Study, ok: list[dict], L: MetricSpec, F: MetricSpec | None, base: dict) -> list[str]:
    """The paper's question: the best LoRA against the best full fine-tuning, learning and forgetting."""
    full = [r for r in ok if r["point"].family == "full"]
    lora = [r for r in ok if r["point"].family != "full"]
    if not full or not lora:
        return []
    fb = max(full, key=lambda r: r["learning"].estimate)["point"]
    lb = max(lora, key=lambda r: r["learning"].estimate)["point"]
    dl = difference(st, L, lb, fb, base)
    s = f"Best LoRA ({lb.name}) vs best full fine-tuning ({fb.name}): learning {dl.text() if dl else 'n/a'}, {_sig(dl)}"
    if F:
        df = difference(st, F, lb, fb, base)
        s += f"; forgetting {df.text() if df else 'n/a'}, {_sig(df)}"
    return [s + " (positive = LoRA learns / forgets more)."]


def vs_full_table(st: Study, ps: list[Point], rows: list[dict], setting: str) -> list[dict]:
    """Every known task at each last checkpoint: value, stderr, seed sd, difference vs base and vs best full FT."""
    base = base_values(rows)
    fin = finals([p for p in ps if p.setting == setting])
    fulls = [p for p in fin if p.family == "full" and not p.diverged]
    out = []
    for p in fin:
        for (task, metric), (v, se, sd) in sorted(p.values.items()):
            s = spec(task)
            if s is None or s.metric != metric:
                continue
            ref = None
            having = [q for q in fulls if (task, metric) in q.values]
            if having and p.family != "full":
                ref = max(having, key=lambda q: q.values[(task, metric)][0] * (1 if s.higher_better else -1))
            out.append({"point": p, "spec": s, "value": v, "stderr": se, "seed_sd": sd, "n_seeds": len(p.run_ids),
                        "vs_base": difference(st, s, p, None, base) if base else None,
                        "vs_full": difference(st, s, p, ref, base) if ref else None, "full": ref})
    return out
