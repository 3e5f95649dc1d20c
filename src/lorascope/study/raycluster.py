"""A study's jobs on a Ray cluster: each job is a Ray task that runs ``python -m lorascope.study.jobs DIR JOB_ID`` on
whichever node has the resources its kind asks for.

    lorascope study configs/paper-v2.yaml --out /shared/studies/p2 --executor ray --address HEAD:6379 \\
        --jobs 16 --resources train:cpus=8,gpus=1,memory=64G --resources eval:cpus=4,gpus=1

The study directory must be the same path on every node (shared storage): jobs read and write only there, and
the scheduler (this process, the Ray driver) decides from the files in it what is done. A task whose node dies
is retried by Ray on another node (``max_retries``); the retry resumes or redoes the job from the files, as a
re-run of the study would. ``logs/nodes.jsonl`` records the node each finished job ran on; each job's log holds
one header line per attempt (the node and host it ran on).

A cluster: ``ray start --head --port 6379 --num-cpus 0`` on the machine that runs the study (the head then
takes no jobs), ``ray start --address HEAD:6379`` on every worker node, each in the same Python environment
with lorascope installed. On SLURM or Kubernetes, Ray's own launchers start these (the Ray docs' SLURM
sbatch template; KubeRay's RayCluster); the study is then submitted from the head as above. Resume: run the
same command again; the scheduler's death ends its Ray tasks, and with them the jobs they started.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

from lorascope.errors import LorascopeError
from lorascope.layout import job_log_path
from lorascope.lifetime import die_with_parent
from lorascope.procenv import job_env
from lorascope.study.jobs import job_command
from lorascope.study.kinds import KINDS

DEFAULT = {"cpus": 1.0, "gpus": 0.0, "memory": None}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise ValueError(f"'{text}' is not a size like 16G or 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_resources(specs: list[str] | None) -> dict[str, dict]:
    """``KIND:cpus=N,gpus=N,memory=SIZE`` (KIND = a job kind or ``all``) -> resources per job kind; later
    specs override earlier ones, unset keys keep the default (1 CPU, no GPU, no memory reservation)."""
    res = {k: dict(DEFAULT) for k in KINDS}
    for spec in specs or []:
        kind, _, body = spec.partition(":")
        kinds = KINDS if kind == "all" else (kind,)
        if kind != "all" and kind not in KINDS:
            raise LorascopeError(
                f"--resources: unknown job kind '{kind}' in '{spec}' (choose from all, {', '.join(KINDS)})"
            )
        for item in filter(None, body.split(",")):
            key, _, val = item.partition("=")
            try:
                v = _bytes(val) if key == "memory" else float(val)
            except ValueError as e:
                raise LorascopeError(f"--resources: {spec}: {key}: {e}") from None
            if key not in DEFAULT or v < 0:
                raise LorascopeError(f"--resources: {spec}: '{item}' must be cpus=N, gpus=N or memory=SIZE")
            for k in kinds:
                res[k][key] = v
    return res


def run_job_task(d: str, job: dict, threads: int) -> dict:
    """The body of one Ray task (runs on the node Ray picked): the job as a subprocess that dies with this
    worker, so a task killed with its node leaves no job writing into the study directory behind it."""
    import ray

    node, host, job_id = ray.get_runtime_context().get_node_id(), socket.gethostname(), job["id"]
    env = job_env(threads)
    with open(job_log_path(Path(d), job_id), "a") as log:  # appended: one header per attempt stays visible
        log.write(f"== lorascope job {job_id} on ray node {node} (host {host}, pid {os.getpid()})\n")
        log.flush()
        rc = subprocess.run(
            job_command(Path(d), job), env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        ).returncode
    return {"rc": rc, "node": node, "host": host}


class RayExecutor:
    """Jobs as Ray tasks on a cluster (``address``, else RAY_ADDRESS, else a Ray instance on this machine);
    at most ``jobs`` in flight, each asking for its kind's resources (parse_resources)."""

    def __init__(
        self, d: Path, jobs: int, address: str | None = None, resources: dict | None = None, max_retries: int = 3
    ):
        import ray

        addr = address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            try:
                # "local": a Ray of its own on this machine, never one a `ray start` left running here
                ray.init(
                    address=addr or "local",
                    num_cpus=None if addr else jobs,
                    log_to_driver=False,
                    **({} if addr else {"include_dashboard": False}),
                )
            except ConnectionError as e:
                raise LorascopeError(f"--address: no Ray cluster at {addr}: {e}") from None
        self.ray, self.d, self.jobs, self.running = ray, Path(d).resolve(), jobs, {}
        self.res = resources or parse_resources(None)
        self._task, self.retries = ray.remote(run_job_task), max_retries

    def slots(self) -> int:
        return self.jobs - len(self.running)

    def current(self) -> list[str]:
        return list(self.running.values())

    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, job: dict, threads: int | None = None) -> None:
        """Start ``job`` as a Ray task asking for its kind's resources (its threads: their CPUs, not ``threads``,
        which counts this machine's cores)."""
        r = self.res[job["kind"]]
        opts = {
            "num_cpus": r["cpus"],
            "num_gpus": r["gpus"],
            "max_retries": self.retries,
            **({"memory": r["memory"]} if r["memory"] else {}),
        }
        threads = max(1, int(r["cpus"]))
        self.running[self._task.options(**opts).remote(str(self.d), job, threads)] = job["id"]

    def poll(self) -> list[tuple[str, int]]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running) or 1, timeout=0.5)
        done = []
        for ref in ready:
            job_id = self.running.pop(ref)
            try:
                out = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # e.g. its node died more often than max_retries
                out = {"rc": -1, "node": None, "host": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            with open(self.d / "logs" / "nodes.jsonl", "a") as f:
                f.write(json.dumps({"job": job_id, **out}) + "\n")
            done.append((job_id, out["rc"]))
        return done
