"""What a study's evaluation jobs will cost, measured: ``lorascope study CONFIG --dry-run --measure``.

    cost = measure_evals(study)          # seconds per eval task on this machine, model load, KL cache
    seconds = job_seconds(study, job, cost)

Evaluation is most of a small study's time (the ``quick`` preset: 71% of its job-seconds), and its cost depends
on the model, the eval groups and the machine, so a constant per job misleads by a factor of 2-3. Here every
eval group runs once on the study's base model, loaded as the evaluation jobs load their model, and each task's
seconds are kept. ``kl_base`` is scored against a second copy of the base model, so its forward pass is
timed (the base against itself is 0 without one); it runs twice and the second run counts: the first builds the
base model's side of the KL cache, which the study would build at its first KL job and then reuses (the cache's
key leaves out the model's path, so this dry run's cache is the study's). A tuned checkpoint costs what the base
costs on the same items: same architecture, its adapter merged at load (LoRA) or its own weights read (full FT).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .studyconfig import StudyConfig

KL = "kl_base"


def measure_evals(study: StudyConfig) -> dict:
    """{"task_s": {task: seconds}, "load_s": seconds a model load took, "kl_cache_s": the KL cache's build}."""
    from .evals.api import evaluate
    from .models import load_model

    t = time.perf_counter()
    model, tok = load_model(study.model)
    load_s = time.perf_counter() - t
    ref = load_model(study.model)[0] if any(_is_kl(x) for g in study.evals.groups for x in g.tasks) else None
    task_s: dict[str, float] = {}
    kl_first: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lorascope-eval-estimate-") as work:
        for i, g in enumerate(study.evals.groups):
            for n in range(2 if any(_is_kl(x) for x in g.tasks) else 1):
                res = evaluate(model, g.tasks, Path(work) / f"{i}-{n}", tokenizer=tok, limit=g.limit, shots=g.shots,
                               samples=g.samples, temperature=g.temperature, batch_size=study.evals.batch_size,
                               allow_code_execution=g.allow_code_execution, reference=ref, progress=False)
                for name, rec in res["tasks"].items():
                    if n == 0 and _is_kl(name):
                        kl_first[name] = rec["elapsed_s"]
                    task_s[name] = rec["elapsed_s"]
    kl_cache_s = sum(max(0.0, kl_first[k] - task_s[k]) for k in kl_first)
    return {"task_s": task_s, "load_s": round(load_s, 2), "kl_cache_s": round(kl_cache_s, 2)}


def job_seconds(study: StudyConfig, job: dict, cost: dict) -> float:
    """Estimated seconds of one eval or eval-trunc job: a model load and the measured tasks of its groups
    (``eval:base`` skips kl_base: the base against itself needs no forward pass)."""
    groups = job.get("groups") or range(len(study.evals.groups))
    base = job["kind"] == "eval" and job.get("run") is None
    tasks = [x for i in groups for x in study.evals.groups[i].tasks if not (base and _is_kl(x))]
    return cost["load_s"] + sum(cost["task_s"].get(x, 0.0) for x in tasks)


def _is_kl(task: str) -> bool:
    return task.partition(":")[0] == KL
