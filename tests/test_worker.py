"""Job workers (lorascope.study.worker via LocalExecutor): a study run by long-lived workers gives the numbers of the
same study run one process per job; a failed job or a dead worker fails only its own job; a killed scheduler
takes its workers with it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_code_corpus

from lorascope.layout import job_log_path as log_path
from lorascope.study.executors import LocalExecutor
from lorascope.study.scheduler import run_study


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_code_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def study_cfg(tmp_path_factory, tiny_model_dir, corpus) -> Path:
    """Every kind of job a worker must run one after another: train, eval (a run and the base), spectrum."""
    p = tmp_path_factory.mktemp("cfg") / "study.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "model": str(tiny_model_dir),
                "seeds": [0],
                "settings": [
                    {
                        "name": "cpt",
                        "data": {"dataset": str(corpus)},
                        "train": {"seq_len": 32, "batch_size": 4, "max_tokens": 256, "checkpoints": []},
                    }
                ],
                "methods": [{"name": "lora", "method": {"kind": "lora", "rank": 2}, "lrs": [1e-2]}],
                "evals": {
                    "checkpoints": "final",
                    "groups": [{"tasks": [f"heldout_bpb:{corpus}", "kl_base"], "limit": 3}],
                },
                "analysis": {"spectrum": {"checkpoints": "final"}},
            }
        )
    )
    return p


@pytest.fixture(scope="module")
def by_workers(tmp_path_factory, study_cfg) -> Path:
    # one slot: every job runs in the same worker process, after the others
    return run_study(study_cfg, [], tmp_path_factory.mktemp("w") / "s", jobs=1, executor="local", progress=False)


def _numbers(d: Path) -> dict:
    """Every number the study's jobs wrote: eval metrics, training losses, spectra."""
    out = {}
    for f in sorted((d / "evals").rglob("results.json")):
        if "groups" not in f.parts:
            out[str(f.relative_to(d))] = {t: v["metrics"] for t, v in json.loads(f.read_text())["tasks"].items()}
    for f in sorted((d / "runs").glob("*/loss.jsonl")):
        out[str(f.relative_to(d))] = [json.loads(line)["loss"] for line in f.read_text().splitlines()]
    for f in sorted((d / "analysis").rglob("spectrum.json")):
        out[str(f.relative_to(d))] = {k: v for k, v in json.loads(f.read_text()).items() if k not in ("timing", "run")}
    return out


def _job_log(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "logs" / "jobs.jsonl").read_text().splitlines()]


def test_workers_give_the_numbers_of_one_process_per_job(tmp_path, study_cfg, by_workers):
    ref = run_study(
        study_cfg, [], tmp_path / "ref", jobs=1, executor="local", executor_opts={"workers": False}, progress=False
    )
    assert _numbers(by_workers) == _numbers(ref)
    assert len(_numbers(ref)) == 4  # base and run evals, a loss curve, a spectrum
    lines = _job_log(by_workers)
    assert len(lines) == 4 and all(j["rc"] == 0 for j in lines)
    # the worker's imports are paid by the first job only
    assert all(0 <= j["startup_s"] <= j["elapsed_s"] for j in lines)
    assert all(j["startup_s"] < lines[0]["startup_s"] for j in lines[1:])
    assert all("startup_s" not in j for j in _job_log(ref))


def _wait(ex: LocalExecutor, timeout: float = 300) -> list[tuple[str, int]]:
    end = time.time() + timeout
    while time.time() < end:
        done = ex.poll()
        if done:
            return done
    raise AssertionError("no job ended")


BASE = {"id": "eval:base", "kind": "eval", "run": None, "ckpt": None}


def test_a_failed_job_or_a_dead_worker_fails_only_its_job(tmp_path, by_workers):
    d = shutil.copytree(by_workers, tmp_path / "s")
    before = _numbers(d)
    shutil.rmtree(d / "evals" / "base")
    ex = LocalExecutor(d, jobs=1)
    try:
        ex.submit(BASE)  # its worker is killed while it starts: this job fails, not the next ones
        os.kill(ex.workers[0].p.pid, signal.SIGKILL)
        assert _wait(ex) == [("eval:base", -signal.SIGKILL)]
        assert "worker process ended" in log_path(d, "eval:base").read_text()
        ex.submit({"id": "eval:nope", "kind": "eval"})  # raises in the new worker (no such job) ...
        assert _wait(ex) == [("eval:nope", 2)]
        assert "error:" in log_path(d, "eval:nope").read_text()
        pid = ex.workers[0].p.pid
        ex.submit(BASE)  # ... which then runs the next job as if it were fresh
        assert _wait(ex) == [("eval:base", 0)]
        assert [w.p.pid for w in ex.workers] == [pid]
    finally:
        ex.close()
    assert _numbers(d) == before
    assert ex.workers == [] and not ex.busy()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_killing_the_scheduler_kills_its_workers(tmp_path, study_cfg):
    code = (
        "import sys; from lorascope.study.scheduler import run_study; "
        "run_study(sys.argv[1], [], sys.argv[2], jobs=2, executor='local', progress=False)"
    )
    sched = subprocess.Popen([sys.executable, "-c", code, str(study_cfg), str(tmp_path / "s")])
    try:
        end, workers = time.time() + 120, []
        while not workers and time.time() < end:
            time.sleep(0.2)
            workers = _children(sched.pid)
        assert workers, "the scheduler started no worker"
        sched.kill()
        sched.wait()
        end = time.time() + 20
        while any(_alive(p) for p in workers) and time.time() < end:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)
    finally:
        sched.kill()
