"""A job worker: one long-lived process per job slot that runs a study's jobs one after another, so the
interpreter start and the imports (torch, transformers, peft: most of a fresh job's fixed cost) are paid once
per slot instead of once per job. lorascope.study.executors.LocalExecutor starts it and talks to it over a pipe::

    python -m lorascope.study.worker       # stdin: one JSON line per job {"dir", "job", "log", "threads"}
                                     # stdout: one JSON line per finished job {"job", "rc", "started"}

Each job runs through the same lorascope.study.jobs.run_job as a one-process job, with its output (fd 1 and 2,
so C-level output too) sent to its own log. Nothing a job builds is kept for the next one: every job loads its
models afresh (cheap once the imports are done), and the environment and working directory are restored after
each job. A job that raises is reported with rc 2 (LorascopeError) or 1 and the worker takes the next job; a
worker that dies fails only the job it was running (the executor starts a new one).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

# what a job imports lazily on first use, imported once here while the worker starts
WARM = (
    "lorascope.study.jobs",
    "lorascope.train.loop",
    "lorascope.evals.api",
    "lorascope.analysis.spectrum",
    "transformers.modeling_utils",
    "peft",
)


def warm_up() -> None:
    import importlib

    for name in WARM:
        importlib.import_module(name)


def run_to_log(d: str, job_id: str, log_file: str, threads: int | None = None) -> int:
    """Run one job with fd 1/2 sent to its log, on ``threads`` threads (the scheduler's share of the free cores;
    models.load_base reads LORASCOPE_THREADS); its return code as a one-process job would give it."""
    from pathlib import Path

    from lorascope.study.jobs import run_logged

    env, cwd = dict(os.environ), os.getcwd()
    if threads:
        os.environ.update(LORASCOPE_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            rc = run_logged(Path(d), job_id)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    # a job must not change the next one's process state
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    _release_memory()
    return rc


def _release_memory() -> None:
    """What a finished job held goes back to the kernel, not only to the allocator (an idle worker stays small)."""
    gc.collect()
    import torch

    from lorascope.procenv import release_memory

    release_memory()

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve(requests, replies) -> None:
    """Run each requested job in turn until the request stream ends (the executor closed it, or died)."""
    for line in requests:
        req = json.loads(line)
        started = time.time()
        rc = run_to_log(req["dir"], req["job"], req["log"], req.get("threads"))
        replies.write(json.dumps({"job": req["job"], "rc": rc, "started": started}) + "\n")
        replies.flush()


def main() -> int:
    # replies keep the pipe the executor reads; everything else printed outside a job goes to stderr, which the
    # executor points at the log of the job that made it start this worker (import errors land there)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    warm_up()
    serve(sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
