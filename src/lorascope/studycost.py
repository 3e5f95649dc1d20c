"""What a study will cost before it runs: ``lorascope study CONFIG --dry-run``.

    print(dry_run(load_study("configs/quick.yaml"), tokens_per_s=90, eval_job_s=60))

Lists every planned run (with ``lrs: auto``, the search runs of the first seed, then the other seeds at the LR
the search will choose, shown as ``lr<chosen>``), its training tokens and checkpoints, the jobs per kind, the
tokens in total (and with every allowed grid extension), and an estimated time from a stated training speed
and a stated time per evaluation job, both for the whole machine (parallel jobs share its cores, so --jobs
does not divide the estimate). Both speeds are inputs, printed as assumptions: the estimate is only as
good as them (measure yours with ``lorascope train`` on one run and pass it with ``--tokens-per-s``).
"""

from __future__ import annotations

from collections import Counter

from .config import RunConfig
from .jobs import build_jobs
from .studyconfig import AutoLR, StudyConfig, budgets, checkpoint_names, make_run, planned_tokens, search_budget
from .studyplan import plan_runs


def planned(study: StudyConfig) -> tuple[list[dict], list[dict]]:
    """(runs the study will train if no search extends its grid, the runs each extension would add)."""
    runs, _ = plan_runs(study, None)
    extra: list[dict] = []
    for s in study.settings:
        for m in study.methods:
            if not isinstance(m.lrs, AutoLR):
                continue
            grid = m.lrs.grid(m.method)
            chosen = grid[len(grid) // 2]  # stands in for the LR the search will choose
            search = make_run(study, s, m, chosen, study.seeds[0], search_budget(s, m.lrs.budget), "lr-search")
            for seed in study.seeds:
                for b in budgets(s):
                    r = make_run(study, s, m, chosen, seed, b)
                    if r["run_id"] != search["run_id"]:
                        runs.append({**r, "label": r["label"].replace(f"/lr{chosen:g}/", "/lr<chosen>/")})
            extra += [search] * m.lrs.max_extensions
    return runs, extra


def dry_run(study: StudyConfig, tokens_per_s: float, eval_job_s: float) -> str:
    runs, extra = planned(study)
    graph = build_jobs(study, runs)
    kinds = Counter(j["kind"] for j in graph)
    lines = [f"study {study.name}: {len(runs)} runs (model {study.model}, seeds {study.seeds})"]
    total, unknown = 0, 0
    for r in runs:
        cfg = RunConfig.model_validate(r["config"])
        tok = planned_tokens(cfg)
        total += tok or 0
        unknown += tok is None
        what = f"{tok:,} tokens" if tok is not None else f"{cfg.train.epochs} epoch(s), tokens depend on the data"
        lines.append(f"  {r['label']:<44} {r.get('role', 'main'):<9} {what:<22} "
                     f"checkpoints {', '.join(checkpoint_names(cfg))}")
    ext = sum(planned_tokens(RunConfig.model_validate(r["config"])) or 0 for r in extra)
    train_s = total / tokens_per_s
    eval_s = (kinds["eval"] + kinds["eval-trunc"]) * eval_job_s
    lines += [f"jobs: {len(graph)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
              f"training tokens: {total:,} planned" + (f" (+ {unknown} epoch-budget runs not counted)" if unknown
                                                      else "") + (f"; up to {total + ext:,} if every LR search "
                                                                  f"uses all its extensions" if ext else ""),
              f"estimated time: {_hms(train_s + eval_s)} = training {_hms(train_s)} at {tokens_per_s:g} tokens/s "
              f"(ASSUMED, --tokens-per-s: the whole machine's, whatever --jobs) + "
              f"{kinds['eval'] + kinds['eval-trunc']} evaluation jobs x {eval_job_s:g} s (ASSUMED, --eval-job-s); "
              f"analysis jobs and set-up not included" + (f"; the {unknown} epoch-budget runs are not estimated" if unknown
                                                        else "")]
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"
