"""What a study's evaluation jobs will cost, measured: ``lorascope study CONFIG --dry-run --measure``.

    cost = measure_evals(study)          # seconds per eval task on this machine, model load, KL cache
    seconds = job_seconds(study, job, cost)

Evaluation is most of a small study's time (bench/RESULTS.md: the ``quick`` preset's job-seconds), and its cost
depends on the model, the eval groups and the machine, so a constant per job misleads several-fold. Here every
eval group runs once on the study's base model, loaded as the evaluation jobs load their model, and each task's
seconds are kept. ``kl_base`` is scored against a second copy of the base model, so its forward pass is
timed (the base against itself is 0 without one); it runs twice and the second run counts: the first builds the
base model's side of the KL cache, which the study would build at its first KL job and then reuses (the cache's
key leaves out the model's path, so this dry run's cache is the study's). A tuned checkpoint costs what the base
costs on the same items: same architecture, its adapter merged at load (LoRA) or its own weights read (full FT),
except in ``kl_base``: a checkpoint whose output head moved (full FT, a trained ``lm_head`` or tied embedding)
also runs the base's head on the cached hidden states (kl_cache), so the KL tasks run a third time with the
base copy's head weight moved a little, and those seconds count for such runs' jobs (``moved_head_s``).

With the study directory (``--out``), each group's first run on the base model is written where the study's
base job writes it (``evals/base/groups/<i>/``, the directory then holds this study's study.yaml), and that job
reuses it unless its settings differ (lorascope.study.jobs.reusable: e.g. when the runs' data exclude eval items,
which only training reveals): the base model is evaluated once, not twice.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from lorascope.study.config import StudyConfig


def measure_evals(study: StudyConfig, out: Path | None = None) -> dict:
    """{"task_s": {task: seconds}, "load_s": seconds a model load took, "kl_cache_s": the KL cache's build};
    with ``out`` (the study directory) the base model's results are kept there for the study's base job."""
    from lorascope.evals.api import evaluate
    from lorascope.evals.catalog import uses_reference
    from lorascope.models import load_model
    from lorascope.study.jobs import group_options

    t = time.perf_counter()
    model, tok = load_model(study.model)
    load_s = time.perf_counter() - t
    kl_tasks = {x for g in study.evals.groups for x in g.tasks if uses_reference(x)}
    ref = load_model(study.model)[0] if kl_tasks else None
    task_s: dict[str, float] = {}
    keep = _claim_base_dir(study, out) if out else None
    with tempfile.TemporaryDirectory(prefix="lorascope-eval-estimate-") as work:

        def run(i: int, tasks: list[str], tag: str) -> dict[str, float]:
            res = evaluate(
                model,
                tasks,
                keep / "groups" / str(i) if keep and tag == "first" else Path(work) / f"{i}-{tag}",
                tokenizer=tok,
                reference=ref,
                progress=False,
                **group_options(study, study.evals.groups[i]),
            )
            return {name: rec["elapsed_s"] for name, rec in res["tasks"].items()}

        first: dict[str, float] = {}
        moved: dict[str, float] = {}
        for i, g in enumerate(study.evals.groups):
            first.update(run(i, g.tasks, "first"))
            kl = [x for x in g.tasks if uses_reference(x)]
            if kl:  # again, now from the cache the first run built: what each KL job pays
                task_s.update(run(i, kl, "cached"))
                with _head_moved(model):  # what a KL job of a run whose head moved pays
                    moved.update(run(i, kl, "moved"))
    task_s = {**first, **task_s}
    kl_cache_s = sum(max(0.0, first[k] - task_s[k]) for k in kl_tasks)
    return {"task_s": task_s, "moved_head_s": moved, "load_s": round(load_s, 2), "kl_cache_s": round(kl_cache_s, 2)}


@contextmanager
def _head_moved(model):
    """While open, the model's output head has a weight of its own (untied), one entry moved: the KL then takes
    the path of a checkpoint whose head differs from the base's."""
    import torch

    head = model.get_output_embeddings()
    weight = head.weight
    moved = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        moved.view(-1)[0] += 1e-3
    head.weight = moved
    try:
        yield
    finally:
        head.weight = weight


def _claim_base_dir(study: StudyConfig, out: Path) -> Path:
    """The base job's directory in study dir ``out``, which must be new or hold this study (then claimed)."""
    import yaml

    from lorascope.config import dump
    from lorascope.fileio import atomic_write_text
    from lorascope.study.scheduler import check_same_study

    check_same_study(out, study)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.yaml", yaml.safe_dump(dump(study), sort_keys=False))
    return out / "evals" / "base"


def job_seconds(study: StudyConfig, job: dict, cost: dict, moved_head: bool = False) -> float:
    """Estimated seconds of one eval or eval-trunc job: a model load and the measured tasks of its groups
    (``eval:base`` skips kl_base: the base against itself needs no forward pass); ``moved_head``: the job's run
    trains the output head, so its KL tasks cost what they did with a moved head."""
    from lorascope.evals.catalog import uses_reference

    groups = job.get("groups") or range(len(study.evals.groups))
    base = job["kind"] == "eval" and job.get("run") is None
    tasks = [x for i in groups for x in study.evals.groups[i].tasks if not (base and uses_reference(x))]
    moved = cost.get("moved_head_s", {}) if moved_head else {}
    return cost["load_s"] + sum(moved.get(x, cost["task_s"].get(x, 0.0)) for x in tasks)


def moves_head(cfg) -> bool:
    """Whether a run (its RunConfig) trains the output head: full FT, or an adapter with lm_head / the (tied)
    embedding trained."""
    m = cfg.method
    return m.kind == "full" or bool(m.train_lm_head or m.train_embed_tokens)
