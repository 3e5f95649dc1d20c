"""A study over a Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster): jobs land on every
node, a node removed in the middle of training costs nothing (Ray retries the task elsewhere, the job resumes
from its files) and the results equal an uninterrupted run's."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import processes_naming

from lorascope.errors import LorascopeError
from lorascope.study.raycluster import parse_resources
from lorascope.study.scheduler import run_study


def test_resources_per_job_kind():
    res = parse_resources(["all:cpus=2", "train:gpus=1,memory=16G", "eval-trunc:memory=512M"])
    assert res["train"] == {"cpus": 2.0, "gpus": 1.0, "memory": 16 * 2**30}
    assert res["eval"] == {"cpus": 2.0, "gpus": 0.0, "memory": None}
    assert res["eval-trunc"]["memory"] == 512 * 2**20
    assert parse_resources(None)["spectrum"] == {"cpus": 1.0, "gpus": 0.0, "memory": None}


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("trian:cpus=1", "unknown job kind 'trian'"),
        ("train:tpus=1", "'tpus=1' must be cpus=N, gpus=N or memory=SIZE"),
        ("eval:memory=lots", "memory: 'lots' is not a size"),
        ("eval:cpus=-1", "must be cpus=N"),
    ],
)
def test_bad_resources_name_the_spec(spec, msg):
    with pytest.raises(LorascopeError, match="--resources: .*" + msg.replace("(", r"\(")):
        parse_resources([spec])


def test_address_only_with_ray(tmp_path):
    from typer.testing import CliRunner

    from lorascope.cli import app

    res = CliRunner().invoke(app, ["study", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--address", "h:1"])
    assert res.exit_code == 2 and "only with --executor ray" in res.output


def _study(tmp_path: Path, model_dir: Path) -> Path:
    rows = [{"text": f"def add_{i}(a, b):\n    '''Add {i}.'''\n    return a + b + {i}\n\n" * 8} for i in range(60)]
    corpus = tmp_path / "code.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    study = {
        "name": "ray",
        "model": str(model_dir),
        "seeds": [0],
        "settings": [
            {
                "name": "cpt",
                "data": {"dataset": str(corpus)},
                "train": {"seq_len": 32, "batch_size": 4, "max_tokens": 2048, "checkpoints": [], "save_state_every": 2},
            }
        ],
        "methods": [
            {"name": "full", "method": {"kind": "full"}, "lrs": [1e-3]},
            {"name": "lora", "method": {"kind": "lora", "rank": 2}, "lrs": [1e-2]},
        ],
        "evals": {"checkpoints": "final", "groups": [{"tasks": [f"heldout_bpb:{corpus}"], "limit": 4}]},
    }
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study))
    return p


def _results(d: Path) -> dict:
    return {
        str(f.relative_to(d)): {t: v["metrics"] for t, v in json.loads(f.read_text())["tasks"].items()}
        for f in sorted((d / "evals").rglob("results.json"))
        if "groups" not in f.parts
    }


def _lines(f: Path) -> list[dict]:
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _attempts(d: Path, job: str) -> list[str]:
    """The Ray node of each attempt of a job, from the header lines of its log."""
    log = d / "logs" / (job.replace(":", "_") + ".log")
    text = log.read_text() if log.exists() else ""
    return [line.split(" on ray node ")[1].split()[0] for line in text.splitlines() if line.startswith("== ")]


def _remove_a_training_node(cluster, d: Path, proc, timeout: float = 240) -> tuple[str, bool]:
    """Wait until a training job has saved its state on a worker node, then kill that node. Returns the job
    and whether the kill came before the job completed (the retry then has to resume)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for run in (d / "runs").glob("*/state/progress.json") if (d / "runs").exists() else []:
            job = f"train:{run.parent.parent.name}"
            node = next((n for n in cluster.worker_nodes if _attempts(d, job)[-1:] == [n.node_id]), None)
            if node is not None:
                complete = (run.parent.parent / "COMPLETE").exists()
                cluster.remove_node(node, allow_graceful=False)
                return job, not complete
        time.sleep(0.05)
    out = proc.communicate()[0] if proc.poll() is not None else ""
    raise AssertionError(f"no training job saved its state on a worker node in time\n{out}")


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of a head that takes no jobs (0 CPUs) and two worker nodes of 1 CPU each: every job runs on
    a worker node, one job per node at a time."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 80 * 2**20}
    c = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False, **small}
    )
    for _ in range(2):
        c.add_node(num_cpus=1, **small)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def study_and_ref(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """The study file, and its uninterrupted results (in-process run)."""
    tmp = tmp_path_factory.mktemp("ray-study")
    cfg = _study(tmp, tiny_model_dir)
    return cfg, run_study(cfg, [], tmp / "ref", executor="inline", progress=False)


def _start(cfg: Path, d: Path, address: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "lorascope",
        "study",
        str(cfg),
        "--out",
        str(d),
        "--executor",
        "ray",
        "--address",
        address,
        "--jobs",
        "2",
        "--resources",
        "all:cpus=1",
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LORASCOPE_TEST_THREADS": "1"},
    )


def _finish(p: subprocess.Popen) -> None:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out


def _check_complete_once_and_same(d: Path, ref: Path) -> list[dict]:
    """Every job finished exactly once with success, no training step logged twice, the reference's numbers."""
    jobs = _lines(d / "logs" / "jobs.jsonl")
    assert sorted(j["job"] for j in jobs) == sorted(j["id"] for j in json.loads((d / "jobs.json").read_text()))
    assert all(j["rc"] == 0 for j in jobs)
    for run in (d / "runs").iterdir():
        steps = [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), "a logged step appears twice"
    got, want = _results(d), _results(ref)
    assert got.keys() == want.keys() and len(got) == 3
    for k, v in got.items():
        for task, metrics in v.items():
            for m, x in metrics.items():
                if isinstance(x, float):
                    assert x == pytest.approx(want[k][task][m], rel=1e-4, abs=1e-6), (k, task, m)
    return jobs


@pytest.mark.slow
def test_killed_driver_leaves_no_job_behind_and_a_rerun_completes(cluster, study_and_ref, tmp_path):
    cfg, ref = study_and_ref
    d = tmp_path / "shared" / "study"
    p = _start(cfg, d, cluster.address)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not list(d.glob("runs/*/state/progress.json")):
        time.sleep(0.05)
    p.kill()  # the scheduler (the Ray driver) dies; Ray ends its tasks, and each job dies with its task
    p.wait()
    assert not list(d.glob("runs/*/COMPLETE")), "killed too late to test a resume"
    deadline = time.time() + 30
    while processes_naming(d, b"lorascope.study.jobs") and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_naming(d, b"lorascope.study.jobs"), "a job outlived the study that started it"
    _finish(_start(cfg, d, cluster.address))  # the same command again
    _check_complete_once_and_same(d, ref)


@pytest.mark.slow
def test_study_over_a_two_node_cluster_survives_a_node_removal(cluster, study_and_ref, tmp_path):
    cfg, ref = study_and_ref
    d = tmp_path / "shared" / "study"
    ids = {n.node_id for n in cluster.worker_nodes}
    p = _start(cfg, d, cluster.address)
    killed_job, before_complete = _remove_a_training_node(cluster, d, p)
    _finish(p)
    jobs = _check_complete_once_and_same(d, ref)
    placed = _lines(d / "logs" / "nodes.jsonl")
    assert len(placed) == len(jobs)
    # the jobs started on both worker nodes; the killed job was retried on the survivor, where all jobs ended
    tries = {j["job"]: _attempts(d, j["job"]) for j in jobs}
    assert {n for t in tries.values() for n in t} == ids
    assert len(tries[killed_job]) == 2 and tries[killed_job][0] != tries[killed_job][1]
    assert [x["node"] for x in placed if x["job"] == killed_job] == tries[killed_job][1:]
    assert sum(len(t) for t in tries.values()) == len(jobs) + 1  # one retry, nothing else ran twice
    print(
        f"\nattempts per node: { {n[:8]: sum(t.count(n) for t in tries.values()) for n in ids} }; "
        f"removed the node of {killed_job} {'before' if before_complete else 'after'} it completed"
    )
