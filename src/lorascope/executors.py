"""Executors run a study's jobs: each is a small object with ``slots() / submit(job_id) / poll() / current() /
busy()``; the scheduler (lorascope.study) decides what to submit, the executor only runs it.

    ex = LocalExecutor(study_dir, jobs=2)       # subprocesses on this machine (the default)
    ex = RayExecutor(study_dir, jobs=8, address="HEAD:6379")  # Ray tasks on a cluster (lorascope.raycluster)
    ex = InlineExecutor(study_dir)              # in this process, one at a time (tests, debugging)
    ex.submit("train:1a2b3c4d5e"); ... done = ex.poll()   # [(job_id, returncode)]

Local and Ray jobs are the command ``python -m lorascope.jobs DIR JOB_ID`` (under ``accelerate launch`` for
training when the study has a launcher; lorascope.jobs.job_command): a job killed half-way leaves
only its own partial files (which the next attempt redoes or resumes) and never the parent's state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import traceback
from pathlib import Path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # A killed study must not leave orphan jobs writing into the directory a re-run is now using.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def job_cmd(d: Path, job_id: str) -> list[str]:
    from .jobs import job_command

    return job_command(d, job_id)


def job_env(jobs: int) -> dict:
    """Split the cores between parallel jobs (models.load_base reads LORASCOPE_THREADS)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    return {**os.environ, "LORASCOPE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def log_path(d: Path, job_id: str) -> Path:
    return d / "logs" / (job_id.replace(":", "_") + ".log")


class LocalExecutor:
    """Up to `jobs` subprocesses at once; each job's output in DIR/logs/<job>.log."""

    def __init__(self, d: Path, jobs: int):
        self.d, self.jobs, self.running = d, jobs, {}

    def slots(self) -> int:
        return self.jobs - len(self.running)

    def current(self) -> list[str]:
        return list(self.running)

    def busy(self) -> bool:
        """Jobs submitted whose end poll() has not reported yet."""
        return bool(self.running)

    def submit(self, job_id: str) -> None:
        log = open(log_path(self.d, job_id), "w")
        p = subprocess.Popen(job_cmd(self.d, job_id), stdout=log, stderr=subprocess.STDOUT, env=job_env(self.jobs),
                             preexec_fn=_die_with_parent)
        self.running[job_id] = (p, log)

    def poll(self) -> list[tuple[str, int]]:
        done = []
        for jid, (p, log) in list(self.running.items()):
            if p.poll() is not None:
                log.close()
                done.append((jid, p.returncode))
                del self.running[jid]
        if not done:
            time.sleep(0.2)
        return done


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

    def submit(self, job_id: str) -> None:
        from .errors import LorascopeError
        from .jobs import run_job

        rc = 0
        with open(log_path(self.d, job_id), "w") as log:
            try:
                run_job(self.d, job_id)
            except LorascopeError as e:
                log.write(f"error: {e}\n")
                rc = 2
            except Exception:  # a failed job must not stop the others; its log says why
                log.write(traceback.format_exc())
                rc = 1
        self.done.append((job_id, rc))

    def poll(self) -> list[tuple[str, int]]:
        done, self.done = self.done, []
        return done


def _ray_executor(d: Path, jobs: int, **opts):
    # Ray executor (lorascope.raycluster): imported on use, so the other executors never import ray.
    from .raycluster import RayExecutor

    return RayExecutor(d, jobs, **opts)


EXECUTORS = {"local": LocalExecutor, "ray": _ray_executor, "inline": InlineExecutor}
