"""What a study's own jobs cost, read from its files: the price list of "what it would take" and ``--resolve``.

    >>> c = study_costs(Path("studies/quick"))
    >>> c.per_seed_s(), c.item_s["heldout_bpb:code-cpt"]      # CPU-seconds of one more seed; of one more item
    (1460.2, 0.85)

Sources: ``logs/jobs.jsonl`` (one line per finished job: its wall seconds, and ``threads`` where recorded),
``runs.json`` (which runs are main runs, of which configuration), ``study.yaml`` (eval group limits) and each
evaluation's ``results.json`` (per task: items evaluated and seconds spent). A job's CPU-seconds are its wall
seconds times the threads it had; a log line without ``threads`` counts one core, and ``cores_known`` says so.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import LorascopeError


@dataclass
class StudyCosts:
    run_s: dict[str, float] = field(default_factory=dict)  # run id -> CPU-s of all its jobs (train, evals, analysis)
    train_s: dict[str, float] = field(default_factory=dict)  # run id -> CPU-s of its training job
    item_s: dict[str, float] = field(default_factory=dict)  # task -> CPU-s per evaluated item (median over jobs)
    items: dict[str, int] = field(default_factory=dict)  # task -> items one evaluation of it scored (most seen)
    eval_dirs: dict[str, int] = field(default_factory=dict)  # task -> evaluations of main runs and base scoring it
    limits: dict[str, int | None] = field(default_factory=dict)  # task -> its eval group's limit in study.yaml
    sized_by_limit: dict[str, bool] = field(default_factory=dict)  # False: the task ignores `limit` (e.g. tokens)
    configs: dict[tuple, list[str]] = field(default_factory=dict)  # main configuration -> its run ids (seeds)
    eval_dirs_of_run: dict[str, int] = field(default_factory=dict)  # run id -> its evaluated checkpoints
    cores_known: bool = False

    def per_seed_s(self) -> float:
        """CPU-s of one more seed of every main configuration: each configuration's mean over its seeds."""
        total = 0.0
        for rids in self.configs.values():
            known = [self.run_s[r] for r in rids if r in self.run_s]
            total += statistics.fmean(known) if known else 0.0
        return total

    def train_per_seed_s(self) -> float:
        """The training part of per_seed_s (what scales with the token budget)."""
        total = 0.0
        for rids in self.configs.values():
            known = [self.train_s[r] for r in rids if r in self.train_s]
            total += statistics.fmean(known) if known else 0.0
        return total

    def evals_per_seed(self) -> int:
        """Evaluations one more seed adds (each main configuration's checkpoints)."""
        return sum(self.eval_dirs_of_run.get(rids[0], 0) for rids in self.configs.values() if rids)

    def reeval_s(self, task: str, items: int) -> float:
        """CPU-s of evaluating `task` again on `items` items in every evaluation that scored it."""
        return items * self.item_s.get(task, 0.0) * self.eval_dirs.get(task, 0)

    def more_items_per_seed_s(self, task: str, items: int) -> float:
        """Extra CPU-s a new seed's evaluations spend when `task` scores `items` instead of today's count."""
        extra = max(items - self.items.get(task, 0), 0)
        return extra * self.item_s.get(task, 0.0) * self.evals_per_seed()


def _jobs(d: Path) -> list[dict]:
    f = d / "logs" / "jobs.jsonl"
    if not f.exists():
        return []
    out = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LorascopeError(f"{f}: line {n} is not JSON ({e.msg})") from None
    return out


def _group_limits(d: Path) -> dict[str, int | None]:
    f = d / "study.yaml"
    doc = yaml.safe_load(f.read_text(encoding="utf-8")) if f.exists() else {}
    return {t: g.get("limit") for g in ((doc or {}).get("evals") or {}).get("groups") or [] for t in g["tasks"]}


def _eval_results(d: Path) -> list[tuple[str | None, dict]]:
    """(run id or None for the base model, results.json) of every evaluation of the study's runs and base."""
    out = []
    for f in sorted((d / "evals").glob("*/results.json")) + sorted((d / "evals").glob("*/*/results.json")):
        rel = f.relative_to(d / "evals").parts
        if rel[0] != "base" and rel[1].startswith("truncate-"):
            continue  # truncations are analysis, not part of a seed's price
        out.append((None if rel[0] == "base" else rel[0], json.loads(f.read_text(encoding="utf-8"))))
    return out


def study_costs(d: Path) -> StudyCosts:
    """The price list of the study in d, from its own files (empty parts where nothing has run yet)."""
    d = Path(d)
    c = StudyCosts(limits=_group_limits(d))
    last = {j.get("job"): j for j in _jobs(d) if j.get("rc") == 0 and isinstance(j.get("elapsed_s"), (int, float))}
    lines = list(last.values())  # a job run again (after --resolve raised a limit) counts once, at its last run
    c.cores_known = bool(lines) and all(isinstance(j.get("threads"), (int, float)) for j in lines)
    per_item: dict[str, list[float]] = {}
    for j in lines:
        kind, _, rest = j["job"].partition(":")
        rid = rest.partition(":")[0]
        cpu = j["elapsed_s"] * float(j.get("threads") or 1)
        if kind in ("train", "eval", "spectrum") and rid != "base":
            c.run_s[rid] = c.run_s.get(rid, 0.0) + cpu
        if kind == "train":
            c.train_s[rid] = cpu
    threads = statistics.fmean([float(j.get("threads") or 1) for j in lines]) if lines else 1.0
    runs = json.loads((d / "runs.json").read_text(encoding="utf-8")) if (d / "runs.json").exists() else []
    main = {r["run_id"] for r in runs if r.get("role", "main") == "main"}
    for rid, res in _eval_results(d):
        if rid is not None:
            c.eval_dirs_of_run[rid] = c.eval_dirs_of_run.get(rid, 0) + 1
        for task, r in (res.get("tasks") or {}).items():
            n, secs = r.get("n"), r.get("elapsed_s")
            if rid is None or rid in main:  # what more items re-evaluates (an LR search keeps its evaluations)
                c.eval_dirs[task] = c.eval_dirs.get(task, 0) + 1
            if isinstance(n, int) and n > 0:
                c.items[task] = max(c.items.get(task, 0), n)
                if isinstance(secs, (int, float)):
                    per_item.setdefault(task, []).append(secs * threads / n)
            ignored = str(((r.get("info") or {}).get("limit")) or "").startswith("ignored")
            c.sized_by_limit[task] = not ignored
    c.item_s = {t: statistics.median(v) for t, v in per_item.items()}
    for r in runs:
        if r.get("role", "main") == "main":
            key = (r["setting"], r["method_name"], r["lr"], json.dumps(r.get("budget"), sort_keys=True))
            c.configs.setdefault(key, []).append(r["run_id"])
    return c
