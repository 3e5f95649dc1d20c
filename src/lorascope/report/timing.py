"""Where a study's time went: each finished job's wall time (logs/jobs.jsonl, written by the scheduler) split
into the work the job itself recorded (training loop, evaluation tasks, analysis) and the rest, its overhead
(interpreter start, imports, model loads, writing results).

Work recorded per job kind: train -> summary.json "wall_s"; eval / eval-trunc -> the sum of each task's
"elapsed_s" in results.json; spectrum -> spectrum.json timing "analysis_s". A job whose files record no work
(truncate, or a failed job) counts wholly as its kind's category, its overhead unknown.

Example::

    >>> rows = timing_rows(load_study_dir(Path("studies/quick")))
    >>> rows[0]
    ['train', 3, 412.5, 380.1, 0.0, 0.0, 32.4, 10.8, '61%']
"""

from __future__ import annotations

from lorascope.study.kinds import CATEGORY

from .collect import BASE, Study

CATEGORIES = ("train", "eval", "analysis")


def _eval_work(res: dict | None) -> float | None:
    secs = [t.get("elapsed_s") for t in ((res or {}).get("tasks") or {}).values()]
    return sum(secs) if secs and all(isinstance(s, (int, float)) for s in secs) else None


def recorded_work(st: Study, job: str) -> float | None:
    """Seconds of work the job's own output files record, or None when they record none."""
    kind, _, rest = job.partition(":")
    rid, _, ck = rest.partition(":")
    if kind == "train":
        run = next((r for r in st.runs if r["run_id"] == rid), None)
        return ((run or {}).get("summary") or {}).get("wall_s")
    if kind == "eval":
        return _eval_work(st.base if rid == BASE else st.evals.get((rid, ck)))
    if kind == "eval-trunc":
        return _eval_work(st.evals.get((rid, f"truncate-{ck}")))
    if kind == "spectrum":
        return ((st.spectra.get((rid, ck)) or {}).get("timing") or {}).get("analysis_s")
    return None


def timing_rows(st: Study) -> list[list]:
    """[kind, jobs, wall s, train s, eval s, analysis s, overhead s, overhead s per job, share of all wall]
    per job kind, then a total row; overhead counts only the jobs that record their work."""
    acc: dict[str, dict] = {}
    for line in st.jobs:
        job, wall = line.get("job", ""), line.get("elapsed_s")
        if not isinstance(wall, (int, float)):
            continue
        kind = job.partition(":")[0]
        a = acc.setdefault(kind, {"n": 0, "wall": 0.0, "work": 0.0, "over": 0.0, "n_over": 0})
        work = recorded_work(st, job) if line.get("rc") == 0 else None
        a["n"] += 1
        a["wall"] += wall
        a["work"] += wall if work is None else min(work, wall)
        if work is not None:
            a["over"] += max(wall - work, 0.0)
            a["n_over"] += 1
    total = sum(a["wall"] for a in acc.values())
    rows = []
    for kind, a in sorted(acc.items(), key=lambda x: -x[1]["wall"]):
        cat = CATEGORY.get(kind)
        rows.append(
            [
                kind,
                a["n"],
                a["wall"],
                *[a["work"] if cat == c else 0.0 for c in CATEGORIES],
                a["over"] if a["n_over"] else None,
                a["over"] / a["n_over"] if a["n_over"] else None,
                f"{100 * a['wall'] / total:.0f}%" if total else None,
            ]
        )
    if rows:
        sums = [sum(r[i] for r in rows if r[i] is not None) for i in range(1, 7)]
        n_over = sum(a["n_over"] for a in acc.values())
        rows.append(["all", *sums, sums[5] / n_over if n_over else None, "100%"])
    return rows
