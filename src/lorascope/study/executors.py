"""Executors run a study's jobs: each is a small object with ``slots() / submit(job, threads) / poll() / current()
/ busy()``; the scheduler (lorascope.study.scheduler) decides what to submit and with how many threads, the
executor only runs it. ``job`` is the job's record in jobs.json: executors choose how to start it by its kind.

    ex = LocalExecutor(study_dir, jobs=2)       # a worker process per slot on this machine (the default)
    ex = RayExecutor(study_dir, jobs=8, address="HEAD:6379")  # Ray tasks on a cluster (lorascope.study.raycluster)
    ex = InlineExecutor(study_dir)              # in this process, one at a time (tests, debugging)
    ex.submit({"id": "train:1a2b3c4d5e", "kind": "train", ...}, threads=2); ... done = ex.poll()  # [(job_id, rc)]

Ray jobs are the command ``python -m lorascope.study.jobs DIR JOB_ID`` (under ``accelerate launch`` for the kinds
a study's launcher starts; lorascope.study.jobs.job_command). Local jobs run that same job function in a
long-lived worker per slot (lorascope.study.worker), and launcher jobs (jobs.uses_launcher) as that command.
Either way a job killed half-way leaves only its own partial files (which the next attempt redoes or resumes)
and never the parent's state, and a killed study takes its job processes with it.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from pathlib import Path

from lorascope import procenv
from lorascope.layout import job_log_path
from lorascope.lifetime import die_with_parent
from lorascope.study.jobs import job_command, run_logged, uses_launcher


class _Worker:
    """One lorascope.study.worker process (a job slot) and the job it runs, if any."""

    def __init__(self, threads: int, first_log):
        # the worker's own output (import warnings or errors) goes to the log of the job that started it
        self.p = subprocess.Popen(
            [sys.executable, "-m", "lorascope.study.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=first_log,
            env=procenv.job_env(threads),
            text=True,
            preexec_fn=die_with_parent,
        )
        self.job: str | None = None

    def alive(self) -> bool:
        return self.p.poll() is None

    def send(self, d: Path, job_id: str, threads: int) -> None:
        self.job = job_id
        req = {"dir": str(d), "job": job_id, "log": str(job_log_path(d, job_id)), "threads": threads}
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.p.stdin.close()  # end of requests: an idle worker exits
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


class LocalExecutor:
    """Up to `jobs` jobs at once on this machine, each job's output in DIR/logs/<job>.log. Jobs run in one
    worker process per slot (lorascope.study.worker), started on first use and reused, so a job does not pay the
    interpreter start and imports again; a training job under a study's launcher (accelerate launch) gets its
    own processes, and so does every job with ``workers=False`` (one process per job, the reference the worker
    path is tested against). ``timing[job]["startup_s"]``: seconds from submit to the job's start in a worker."""

    def __init__(self, d: Path, jobs: int, workers: bool = True):
        self.d, self.jobs, self.running, self.use_workers = d, jobs, {}, workers
        self.workers: list[_Worker] = []
        self.submitted: dict[str, float] = {}
        self.timing: dict[str, dict] = {}

    def slots(self) -> int:
        return self.jobs - len(self.current())

    def current(self) -> list[str]:
        return list(self.running) + [w.job for w in self.workers if w.job]

    def busy(self) -> bool:
        """Jobs submitted whose end poll() has not reported yet."""
        return bool(self.current())

    def submit(self, job: dict, threads: int | None = None) -> None:
        """Start ``job`` with ``threads`` threads (default: this machine's cores split over the slots)."""
        job_id, log = job["id"], open(job_log_path(self.d, job["id"]), "w")
        threads = threads or procenv.threads_per_job(self.jobs)
        self.submitted[job_id] = time.time()
        if uses_launcher(self.d, job) or not self.use_workers:  # processes of its own
            p = subprocess.Popen(
                job_command(self.d, job),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=procenv.job_env(threads),
                preexec_fn=die_with_parent,
            )
            self.running[job_id] = (p, log)
            return
        with log:
            w = next((w for w in self.workers if not w.job and w.alive()), None)
            if w is None:
                self.workers = [w for w in self.workers if w.job or w.alive()]
                w = _Worker(threads, log)
                self.workers.append(w)
            w.send(self.d, job_id, threads)

    def poll(self) -> list[tuple[str, int]]:
        done = []
        for jid, (p, log) in list(self.running.items()):
            if p.poll() is not None:
                log.close()
                done.append((jid, p.returncode))
                del self.running[jid]
        done += self._poll_workers(0.0 if done else 0.2)
        return done

    def _poll_workers(self, wait: float) -> list[tuple[str, int]]:
        busy = [w for w in self.workers if w.job]
        if not busy:
            time.sleep(wait)
            return []
        ready, _, _ = select.select([w.p.stdout for w in busy], [], [], wait)
        done = []
        for w in busy:
            line = w.p.stdout.readline() if w.p.stdout in ready else None
            if line:
                r = json.loads(line)
                self.timing[r["job"]] = {"startup_s": round(max(r["started"] - self.submitted[r["job"]], 0.0), 2)}
                done.append((r["job"], r["rc"]))
            elif line == "" or not w.alive():  # the worker died: its job failed, a new worker takes the next
                rc = w.p.wait() or 1
                with open(job_log_path(self.d, w.job), "a") as log:
                    log.write(f"error: the job's worker process ended (exit code {rc})\n")
                done.append((w.job, rc))
                self.workers.remove(w)
            else:
                continue
            w.job = None
        return done

    def close(self) -> None:
        """End the idle workers (a worker also exits when this process does)."""
        for w in self.workers:
            w.close()
        self.workers = []


class InlineExecutor:
    """Runs each job in this process as it is submitted (no parallelism, no import cost per job; a study's
    launcher is not used here: training runs in one process)."""

    def __init__(self, d: Path, jobs: int = 1):
        self.d, self.done, self.running = d, [], {}

    def slots(self) -> int:
        return 1

    def current(self) -> list[str]:
        return []

    def busy(self) -> bool:
        return bool(self.done)

    def submit(self, job: dict, threads: int | None = None) -> None:
        with open(job_log_path(self.d, job["id"]), "w") as log:
            self.done.append((job["id"], run_logged(self.d, job["id"], err=log)))

    def poll(self) -> list[tuple[str, int]]:
        done, self.done = self.done, []
        return done


def _ray_executor(d: Path, jobs: int, **opts):
    # Ray executor (lorascope.study.raycluster): imported on use, so the other executors never import ray.
    from lorascope.study.raycluster import RayExecutor

    return RayExecutor(d, jobs, **opts)


EXECUTORS = {"local": LocalExecutor, "ray": _ray_executor, "inline": InlineExecutor}
