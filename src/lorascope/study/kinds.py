"""The kinds of study job, one record each: the file a job writes last (its completion marker), the category
the report's timing table counts it under, and whether a study's launcher (accelerate launch) starts it.
Torch-free and dependency-free, so the scheduler, the executors, the cost estimate and the report read it.

    >>> KINDS["train"].launched, KINDS["eval-trunc"].category
    (True, 'eval')
    >>> done_marker(Path("S"), {"kind": "spectrum", "run": "r1", "ckpt": "tok-000000000512"}).as_posix()
    'S/analysis/r1/tok-000000000512/spectrum.json'

How each kind runs is lorascope.study.jobs.RUNNERS (tested to cover exactly these kinds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobKind:
    name: str
    category: str  # "train" | "eval" | "analysis": where the report's timing table counts its seconds
    marker: Callable[[Path, dict], Path]  # the file it writes last: it exists iff the job is done
    launched: bool = False  # started by the study's launcher (accelerate launch, several processes) if any
    tie: int = 2  # among runnable jobs on equally long chains, lower starts first (those that unlock most)


_ALL = (
    JobKind("train", "train", lambda d, j: d / "runs" / j["run"] / "COMPLETE", launched=True, tie=0),
    JobKind("eval", "eval", lambda d, j: d / "evals" / (j["run"] or "base") / (j["ckpt"] or "") / "results.json"),
    JobKind("spectrum", "analysis", lambda d, j: d / "analysis" / j["run"] / j["ckpt"] / "spectrum.json"),
    JobKind("truncate", "analysis", lambda d, j: d / "analysis" / j["run"] / "truncate" / "DONE", tie=1),
    JobKind("eval-trunc", "eval", lambda d, j: d / "evals" / j["run"] / f"truncate-r{j['rank']}" / "results.json"),
)
KINDS: dict[str, JobKind] = {k.name: k for k in _ALL}
CATEGORY = {k.name: k.category for k in _ALL}


def done_marker(d: Path, job: dict) -> Path:
    """The file a job writes last: it exists iff the job is done."""
    return KINDS[job["kind"]].marker(d, job)
