"""Run a study: expand the grid, then train, evaluate and analyse every run, skipping what is done.

    lorascope study configs/quick.yaml --out studies/quick          # resumable; re-run to continue
    lorascope study configs/lr-sweep.yaml settings.0.train.max_tokens=2048 --out studies/lr --jobs 2
    lorascope study configs/quick.yaml 'methods.*.lrs=[1e-4]' --out studies/q2   # '*' = every list item

The study directory (``out``)::

    study.yaml   runs.json   jobs.json      the resolved study, its runs (ids, labels, configs) and job graph
    commands.txt                        every command that ran this study; LOCK while one runs
    logs/<job>.log  logs/jobs.jsonl     each job's output; one line per finished job (rc, elapsed_s)
    runs/<run_id>/                      training run (see lorascope.runlog); DIVERGED if it blew up
    evals/base/results.json             the base model
    evals/<run_id>/<ckpt>/results.json  merged over eval groups; groups/<i>/ hold each group's raw output
    analysis/<run_id>/<ckpt>/spectrum.json
    analysis/<run_id>/truncate/r<k>/    rank-k truncations of full-FT runs; evals/<run_id>/truncate-r<k>/

``--executor local`` (default) runs up to ``--jobs`` jobs at once, ``ray`` runs them as Ray tasks (a cluster via
RAY_ADDRESS), ``inline`` runs them one by one in this process (see lorascope.executors). Every local/Ray job
runs in its own subprocess (``python -m lorascope.study job DIR JOB_ID``) that dies with its parent
(PR_SET_PDEATHSIG), and writes its outputs atomically with a completion marker last; so a study killed at
any point is completed by running the same command again, with no job done twice and none lost. Training jobs
resume from their own saved state.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from .config import RunConfig
from .errors import LorascopeError
from .studyconfig import StudyConfig, checkpoint_names, expand, load_study

# ---------------------------------------------------------------------------------------------------------
# the job graph


def build_jobs(study: StudyConfig, runs: list[dict]) -> list[dict]:
    """Jobs with ids, kinds and dependencies, in a valid order."""
    jobs = []
    ev, an = study.evals, study.analysis
    if ev.base and ev.groups:
        jobs.append({"id": "eval:base", "kind": "eval", "run": None, "ckpt": None, "deps": []})
    for r in runs:
        cfg = RunConfig.model_validate(r["config"])
        rid, cks = r["run_id"], checkpoint_names(cfg)
        jobs.append({"id": f"train:{rid}", "kind": "train", "run": rid, "deps": []})
        for ck in cks:
            groups = [i for i, g in enumerate(ev.groups) if (g.checkpoints or ev.checkpoints) == "all" or ck == cks[-1]]
            if groups:
                jobs.append({"id": f"eval:{rid}:{ck}", "kind": "eval", "run": rid, "ckpt": ck, "groups": groups,
                             "deps": [f"train:{rid}"]})
        if an.spectrum:
            for ck in cks if an.spectrum.checkpoints == "all" else cks[-1:]:
                jobs.append({"id": f"spectrum:{rid}:{ck}", "kind": "spectrum", "run": rid, "ckpt": ck,
                             "deps": [f"train:{rid}"]})
        if an.truncate and cfg.method.kind == "full":
            jobs.append({"id": f"truncate:{rid}", "kind": "truncate", "run": rid, "ckpt": cks[-1],
                         "deps": [f"train:{rid}"]})
            if an.truncate.evaluate and ev.groups:
                for k in an.truncate.ranks:
                    jobs.append({"id": f"eval-trunc:{rid}:r{k}", "kind": "eval-trunc", "run": rid, "rank": str(k),
                                 "deps": [f"truncate:{rid}"]})
    return jobs


def _priority(job: dict) -> int:
    """Training (and truncation) first: they unlock the other jobs, so the parallel slots stay busy to the end."""
    return {"train": 0, "truncate": 1}.get(job["kind"], 2)


def _done_marker(d: Path, job: dict) -> Path:
    k = job["kind"]
    if k == "train":
        return d / "runs" / job["run"] / "COMPLETE"
    if k == "eval":
        return d / "evals" / (job["run"] or "base") / (job["ckpt"] or "") / "results.json"
    if k == "spectrum":
        return d / "analysis" / job["run"] / job["ckpt"] / "spectrum.json"
    if k == "truncate":
        return d / "analysis" / job["run"] / "truncate" / "DONE"
    return d / "evals" / job["run"] / f"truncate-r{job['rank']}" / "results.json"


def _diverged(d: Path, run: str | None) -> bool:
    return bool(run) and (d / "runs" / run / "DIVERGED").exists()


def is_done(d: Path, job: dict) -> bool:
    if job["kind"] != "train" and _diverged(d, job.get("run")):
        return True  # nothing to evaluate on a diverged run
    return _done_marker(d, job).exists() or (job["kind"] == "train" and _diverged(d, job["run"]))


# ---------------------------------------------------------------------------------------------------------
# running one job (inside its own subprocess)


def _evaluate_into(study: StudyConfig, spec: str, out: Path, groups: list[int] | None = None) -> None:
    """Run the eval groups (default: all) into out/groups/<i>/, then merge into out/results.json (written last;
    a group already done by an interrupted attempt is reused, a half-done one is redone by evaluate())."""
    from .evals.api import evaluate

    merged: dict = {"model": spec, "tasks": {}, "derived": {}, "groups": []}
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(study.evals.groups):
        if groups is not None and i not in groups:
            continue
        gdir = out / "groups" / str(i)
        res_file = gdir / "results.json"
        if res_file.exists():
            res = json.loads(res_file.read_text())
        else:
            res = evaluate(spec, g.tasks, gdir, limit=g.limit, shots=g.shots, samples=g.samples,
                           temperature=g.temperature, batch_size=study.evals.batch_size,
                           allow_code_execution=g.allow_code_execution, progress=False)
        merged["tasks"].update(res["tasks"])
        merged["derived"].update(res.get("derived", {}))
        merged["groups"].append({"tasks": g.tasks, "limit": g.limit, "settings": res.get("settings")})
        merged.setdefault("versions", res.get("versions"))
        for f in (gdir / "samples").glob("*.jsonl"):
            shutil.copyfile(f, out / "samples" / f.name)
    from .evals.results import forgetting_mean

    fm = forgetting_mean(merged["tasks"])
    if fm:
        merged["derived"]["forgetting_mean"] = fm
    merged["complete"] = True
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.replace(out / "results.json")


def run_job(d: Path, job_id: str) -> None:
    study = load_study(d / "study.yaml")
    runs = {r["run_id"]: r for r in json.loads((d / "runs.json").read_text())}
    job = next(j for j in json.loads((d / "jobs.json").read_text()) if j["id"] == job_id)
    kind, rid = job["kind"], job.get("run")
    if kind == "train":
        from .train import train

        cfg = RunConfig.model_validate(runs[rid]["config"])
        run_dir = d / "runs" / rid
        try:
            train(cfg, run_dir, progress=False)
        except LorascopeError as e:
            if "diverged" not in str(e):
                raise
            (run_dir / "DIVERGED").write_text(str(e) + "\n")
            return
        s = json.loads((run_dir / "summary.json").read_text())
        if s.get("first_loss") and s.get("final_loss") and s["final_loss"] > s["first_loss"] * study.divergence_factor:
            (run_dir / "DIVERGED").write_text(f"final loss {s['final_loss']:.3f} > {study.divergence_factor} x "
                                              f"first loss {s['first_loss']:.3f}\n")
    elif kind == "eval":
        spec = study.model if rid is None else f"{d / 'runs' / rid}:{job['ckpt']}"
        _evaluate_into(study, spec, _done_marker(d, job).parent, job.get("groups"))
    elif kind == "spectrum":
        from .analysis.spectrum import spectrum_cli

        sp = study.analysis.spectrum
        spectrum_cli(f"{d / 'runs' / rid}:{job['ckpt']}", out=_done_marker(d, job).parent, energy=sp.energy,
                     top_k=sp.top_k, epsilon=sp.epsilon)
    elif kind == "truncate":
        from .analysis.truncate import truncate_cli

        out = d / "analysis" / rid / "truncate"
        truncate_cli(f"{d / 'runs' / rid}:{job['ckpt']}",
                     ranks=",".join(str(k) for k in study.analysis.truncate.ranks), out=out)
        (out / "DONE").write_text("ok\n")
    elif kind == "eval-trunc":
        model_dir = d / "analysis" / rid / "truncate" / f"r{job['rank']}"
        _evaluate_into(study, str(model_dir), _done_marker(d, job).parent)


def _lock(d: Path) -> Path:
    lock = d / "LOCK"
    if lock.exists():
        try:
            pid = int(lock.read_text())
            os.kill(pid, 0)
            raise LorascopeError(f"{d}: another lorascope study (pid {pid}) is running on this directory")
        except (ValueError, ProcessLookupError, PermissionError):
            pass  # stale lock from a killed study
    lock.write_text(str(os.getpid()))
    return lock


def run_study(config: str | Path, overrides: list[str], out: Path, jobs: int = 1, executor: str = "local",
              progress: bool = True) -> Path:
    """Expand and run a study; returns the study dir. Failed jobs are reported and make it exit non-zero;
    the jobs that do not depend on them still run."""
    import yaml
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .config import dump
    from .executors import EXECUTORS, log_path

    if executor not in EXECUTORS:
        raise LorascopeError(f"--executor: unknown '{executor}' (choose from {', '.join(EXECUTORS)})")
    if jobs < 1:
        raise LorascopeError(f"--jobs: must be >= 1 (got {jobs})")
    study = load_study(config, overrides)
    runs = expand(study)
    out = Path(out)
    resolved = dump(study)
    if (out / "study.yaml").exists() and yaml.safe_load((out / "study.yaml").read_text()) != resolved:
        raise LorascopeError(f"{out}: holds a different study (use another --out)")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        _write_text(out / "study.yaml", yaml.safe_dump(resolved, sort_keys=False))
        _write_text(out / "runs.json", json.dumps(runs, indent=2))
        all_jobs = build_jobs(study, runs)
        _write_text(out / "jobs.json", json.dumps(all_jobs, indent=2))
        with open(out / "commands.txt", "a") as f:  # every invocation, for the provenance appendix
            f.write(" ".join(sys.argv) + "\n")
        ex = EXECUTORS[executor](out, jobs)
        pending = [j for j in all_jobs if not is_done(out, j)]
        ok = {j["id"] for j in all_jobs if j not in pending}
        failed: dict[str, int] = {}
        started: dict[str, float] = {}
        timings = open(out / "logs" / "jobs.jsonl", "a")
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[current]}"), disable=not progress) as bar:
            task = bar.add_task(f"study {study.name}", total=len(all_jobs), completed=len(ok), current="")
            while pending or ex.current() or getattr(ex, "done", None):
                for j in [j for j in pending if any(dep in failed for dep in j["deps"])]:
                    failed[j["id"]] = -1  # blocked by a failed dependency
                    pending.remove(j)
                    bar.advance(task)
                ready = sorted((j for j in pending if all(dep in ok for dep in j["deps"])), key=_priority)
                for j in ready[: max(ex.slots(), 0)]:
                    pending.remove(j)
                    if is_done(out, j):  # e.g. the evals of a run that just diverged
                        ok.add(j["id"])
                        bar.advance(task)
                        continue
                    started[j["id"]] = time.time()
                    bar.update(task, current=j["id"])
                    ex.submit(j["id"])
                bar.update(task, current=", ".join(ex.current()[:3]))
                for jid, rc in ex.poll():
                    if rc == 0:
                        ok.add(jid)
                    else:
                        failed[jid] = rc
                    took = time.time() - started[jid]
                    timings.write(json.dumps({"job": jid, "rc": rc, "elapsed_s": round(took, 2),
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
                    timings.flush()
                    bar.advance(task)
                    if progress:  # one line per finished job: the live bar is not drawn when output is a file
                        done_n = len(ok) + len(failed)
                        bar.console.print(f"[green]done[/green] {jid} in {took:.0f} s ({done_n}/{len(all_jobs)})"
                                          if rc == 0 else f"[red]failed[/red] {jid} (log: {log_path(out, jid)})")
        timings.close()
        real = {k: v for k, v in failed.items() if v != -1}
        if failed:
            first = sorted(real)[0]
            raise LorascopeError(f"{len(real)} job(s) failed ({len(failed) - len(real)} more blocked), first: {first} "
                                 f"(log: {log_path(out, first)}); fix and re-run to continue")
    finally:
        lock.unlink(missing_ok=True)
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _main(argv: list[str]) -> int:  # python -m lorascope.study job DIR JOB_ID
    if len(argv) != 3 or argv[0] != "job":
        print("usage: python -m lorascope.study job STUDY_DIR JOB_ID", file=sys.stderr)
        return 2
    try:
        run_job(Path(argv[1]), argv[2])
    except LorascopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
