"""Experiment tracking against real backends: an `mlflow server` process (SQLite store) started here and read back
through MlflowClient, TensorBoard event files read back with tbparse; a server killed mid-run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import write_code_corpus

pytest.importorskip("mlflow")
pytest.importorskip("tbparse")

from lorascope.config import RunConfig, dump, load_run_config  # noqa: E402
from lorascope.train import runlog, tracking  # noqa: E402
from lorascope.train.loop import train  # noqa: E402

TPS = 64  # tokens per step: seq 16 x batch 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(root: Path) -> tuple[subprocess.Popen, str]:
    """An `mlflow server` over a SQLite store in ``root``, on a free port of 127.0.0.1 (not yet answering)."""
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    log = open(root / "server.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True), f"http://127.0.0.1:{port}"


def _wait(proc: subprocess.Popen, uri: str, root: Path) -> str:
    deadline = time.time() + 300  # a busy 2-core machine takes minutes to import and migrate the store
    while time.time() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return uri
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn worker, which we started
        proc.wait(30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started at once (each start is slow): [(proc, uri, store dir)]; the second one is killed."""
    roots = [tmp_path_factory.mktemp("mlflow"), tmp_path_factory.mktemp("mlflow-killed")]
    spawned = [_spawn(r) for r in roots]
    try:
        yield [(proc, _wait(proc, uri, root), root) for (proc, uri), root in zip(spawned, roots)]
    finally:
        for proc, _ in spawned:
            _stop(proc)


@pytest.fixture(scope="module")
def mlflow_uri(servers):
    return servers[0][1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_code_corpus(tmp_path_factory.mktemp("data"), n=40, repeat=4)


def _cfg(model_dir, corpus, tracking_cfg=None, **train_kw) -> RunConfig:
    t = dict(seq_len=16, batch_size=4, max_tokens=6 * TPS, checkpoints=[3 * TPS], lr=1e-2, save_state_every=100)
    t.update(train_kw)
    return RunConfig(
        model=str(model_dir),
        data={"dataset": str(corpus)},
        method={"kind": "lora", "rank": 4, "dropout": 0.0},
        train=t,
        tracking=tracking_cfg,
    )


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in runlog.read_loss(run / "loss.jsonl")]


def test_tracking_is_not_part_of_the_run(tmp_path):
    """A run file's tracking section is read, but changes neither the resolved config (the run id) nor config.yaml."""
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 1e-3}, "tracking": {"log_with": "mlflow", "project": "p"}}))
    with_tracking, without = load_run_config(f), load_run_config(f, ["tracking.log_with=[]"])
    assert with_tracking.tracking.log_with == ["mlflow"] and with_tracking.tracking.project == "p"
    assert dump(with_tracking) == dump(without) and "tracking" not in dump(with_tracking)
    from lorascope.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.log_with"):
        load_run_config(f, ["tracking.log_with=[comet]"])


def test_run_logged_to_mlflow_and_tensorboard(tmp_path, tiny_model_dir, corpus, mlflow_uri):
    """Params, the whole loss curve and the summary in MLflow and TensorBoard; losses as without tracking; a
    checkpoint's evaluation logged later, from its results, at that checkpoint's step into the same runs."""
    from mlflow import MlflowClient
    from tbparse import SummaryReader

    from lorascope.config import TrackingConfig
    from lorascope.evals.api import evaluate

    tc = TrackingConfig(log_with=["mlflow", "tensorboard"], uri=mlflow_uri, project="t-run", run_name="lora")
    plain = train(_cfg(tiny_model_dir, corpus), tmp_path / "plain", progress=False)
    run = train(_cfg(tiny_model_dir, corpus, tc), tmp_path / "tracked", progress=False)
    losses = _losses(run)
    assert losses == _losses(plain) and len(losses) == 6

    ck = "tok-000000000192"  # the checkpoint at 3 x 64 tokens = step 3
    results = evaluate(f"{run}:{ck}", [f"heldout_bpb:{corpus}"], tmp_path / "ev", limit=4, progress=False)
    tracking.log_checkpoint_eval(run, ck, results)

    rec = json.loads((run / "tracking.json").read_text())
    client = MlflowClient(mlflow_uri)
    r = client.get_run(rec["mlflow"]["run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "lora"
    assert r.data.params["method.rank"] == "4" and r.data.params["train.lr"] == "0.01"
    assert client.get_experiment(r.info.experiment_id).name == "t-run"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss"))
    assert [s for s, _ in hist] == list(range(1, 7)) and [v for _, v in hist] == pytest.approx(losses, rel=1e-12)
    bpb = results["tasks"][f"heldout_bpb:{corpus}"]["metrics"]["bpb"]
    key = tracking._metric_key(f"eval/heldout_bpb:{corpus}/bpb")
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)] == [(3, pytest.approx(bpb))]
    assert r.data.metrics["summary/tokens"] == 6 * TPS

    scalars = SummaryReader(rec["tensorboard"]["logdir"]).scalars
    tb_loss = scalars[scalars.tag == "train/loss"].sort_values("step")
    assert list(tb_loss.step) == list(range(1, 7)) and list(tb_loss.value) == pytest.approx(losses, rel=1e-6)
    tb_bpb = scalars[scalars.tag == key]
    assert list(tb_bpb.step) == [3] and list(tb_bpb.value) == pytest.approx([bpb], rel=1e-6)


def test_server_killed_mid_run(tmp_path, tiny_model_dir, corpus, servers, monkeypatch):
    """The server dies after step 2: one warning, the run completes with the losses of an untracked run, and the
    tracked run (read from the server's store) holds what was logged before."""
    from mlflow import MlflowClient

    from lorascope.config import TrackingConfig

    proc, uri, root = servers[1]
    logged = tracking.RunTracker.log_step

    def log_step(self, line):
        if line["step"] == 3:
            _stop(proc)
        logged(self, line)

    monkeypatch.setattr(tracking.RunTracker, "log_step", log_step)
    tc = TrackingConfig(log_with=["mlflow"], uri=uri, project="t-kill")  # no run_name: the directory's
    with pytest.warns(tracking.TrackingWarning, match="mlflow: logging step failed") as caught:
        run = train(_cfg(tiny_model_dir, corpus, tc), tmp_path / "run", progress=False)
    assert len([w for w in caught if issubclass(w.category, tracking.TrackingWarning)]) == 1
    assert (run / "COMPLETE").exists() and proc.poll() is not None
    plain = train(_cfg(tiny_model_dir, corpus), tmp_path / "plain", progress=False)
    assert _losses(run) == _losses(plain)
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    store = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(m.step for m in store.get_metric_history(run_id, "train/loss")) == [1, 2]
    assert store.get_run(run_id).info.run_name == "run"


def test_resumed_run_continues_its_tracked_run(tmp_path, tiny_model_dir, corpus, mlflow_uri, monkeypatch):
    """A run killed after step 4 and started again logs into the same MLflow run (by the id in tracking.json)."""
    from mlflow import MlflowClient

    from lorascope.config import TrackingConfig
    from lorascope.train.loop import Trainer

    cfg = _cfg(tiny_model_dir, corpus, TrackingConfig(log_with=["mlflow"], uri=mlflow_uri, project="t-resume"))
    after = Trainer.after_step

    def killed_at_4(self):
        after(self)
        if self.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_step", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    first = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(first).info.status == "FAILED"
    monkeypatch.setattr(Trainer, "after_step", after)
    run = train(cfg, tmp_path / "run", progress=False)
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == first
    assert client.get_run(first).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(first, "train/loss")} == set(range(1, 7))
    assert len(client.search_runs([client.get_experiment_by_name("t-resume").experiment_id])) == 1


def test_unreachable_backend_at_start_warns_and_trains(tmp_path, tiny_model_dir, corpus):
    from lorascope.config import TrackingConfig

    tc = TrackingConfig(log_with=["mlflow"], uri=f"http://127.0.0.1:{_free_port()}")
    with pytest.warns(tracking.TrackingWarning, match="mlflow: starting the run failed"):
        run = train(
            _cfg(tiny_model_dir, corpus, tc, max_tokens=2 * TPS, checkpoints=[]), tmp_path / "r", progress=False
        )
    assert (run / "COMPLETE").exists() and not (run / "tracking.json").exists()


def test_study_conclusions_from_verdicts_json_and_headline(tmp_path):
    """verdicts.json wins for the verdicts; the recommendation always comes from the report's headline."""
    (tmp_path / "report.html").write_text(
        '<section id="headline"><div class="summary">Setting <b>code-cpt</b><ul>\n'
        '<li>Does LoRA learn less? <b class="answer">yes</b>: by 0.02</li>\n'
        '<li>Does LoRA forget less? <b class="answer">not resolved</b></li></ul>\n'
        '<p class="rec">Recommended: full FT at 1e-4 &amp; seed 0.</p><p>more</p></div></section>'
    )
    from_page = tracking.study_conclusions(tmp_path)
    assert from_page["recommendation/code-cpt"] == "Recommended: full FT at 1e-4 & seed 0."
    assert from_page["verdict/code-cpt/Does LoRA learn less?"] == "yes"
    assert from_page["verdict/code-cpt/Does LoRA forget less?"] == "not resolved"
    comp = {"question": "learns_less", "setting": "code-cpt", "method": "lora-r16", "verdict": "no", "estimate": 0.5}
    (tmp_path / "verdicts.json").write_text(json.dumps({"comparisons": [comp]}))
    from_file = tracking.study_conclusions(tmp_path)
    assert from_file["verdict/code-cpt/learns_less/lora-r16"] == "no"
    assert from_file["code-cpt/learns_less/lora-r16/estimate"] == 0.5
    assert not any(k.startswith("verdict/code-cpt/Does") for k in from_file)
    assert from_file["recommendation/code-cpt"] == from_page["recommendation/code-cpt"]


def test_tiny_study_tracked(tmp_path, tiny_model_dir, mlflow_uri):
    """A study is one experiment with one tracked run per training run, each with its evaluation at its
    checkpoints' steps (logged by the evaluation jobs); `lorascope report` adds the study-level run."""
    from mlflow import MlflowClient
    from tbparse import SummaryReader
    from typer.testing import CliRunner

    from lorascope.cli import app
    from lorascope.study.scheduler import run_study

    corpus = write_code_corpus(tmp_path, n=60, repeat=4)
    spec = {
        "name": "tiny-tracked",
        "model": str(tiny_model_dir),
        "settings": [
            {
                "name": "cpt",
                "data": {"dataset": str(corpus)},
                "train": {"seq_len": 16, "batch_size": 4, "max_tokens": 4 * TPS, "checkpoints": [2 * TPS]},
            }
        ],
        "methods": [
            {"name": "full", "method": {"kind": "full"}, "lrs": [1e-3]},
            {"name": "lora", "method": {"kind": "lora", "rank": 4, "dropout": 0.0}, "lrs": [1e-2]},
        ],
        "evals": {"groups": [{"tasks": [f"heldout_bpb:{corpus}"], "limit": 8}]},
        "tracking": {"log_with": ["mlflow", "tensorboard"], "uri": mlflow_uri},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    d = run_study(tmp_path / "study.yaml", [], tmp_path / "study", executor="inline", progress=False)
    result = CliRunner().invoke(app, ["report", str(d)])
    assert result.exit_code == 0, result.output

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("tiny-tracked")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    study_runs = json.loads((d / "runs.json").read_text())
    assert set(runs) == {r["label"] for r in study_runs} | {"tiny-tracked"}
    key = tracking._metric_key(f"eval/heldout_bpb:{corpus}/bpb")
    for r in study_runs:
        tracked = runs[r["label"]]
        assert (
            tracked.data.tags["lorascope.run_id"] == r["run_id"]
            and tracked.data.tags["lorascope.study"] == spec["name"]
        )
        bpb = {}
        for ck in ("tok-000000000128", "tok-000000000256"):
            res = json.loads((d / "evals" / r["run_id"] / ck / "results.json").read_text())
            step = json.loads((d / "runs" / r["run_id"] / "checkpoints" / ck / "lorascope.json").read_text())["step"]
            bpb[step] = res["tasks"][f"heldout_bpb:{corpus}"]["metrics"]["bpb"]
        hist = {m.step: m.value for m in client.get_metric_history(tracked.info.run_id, key)}
        assert hist == pytest.approx(bpb) and sorted(hist) == [2, 4]
        tb = SummaryReader(
            json.loads((d / "runs" / r["run_id"] / "tracking.json").read_text())["tensorboard"]["logdir"]
        )
        assert sorted(tb.scalars[tb.scalars.tag == key].step) == [2, 4]
    top = runs["tiny-tracked"].data.tags
    assert top["lorascope.kind"] == "study"
    verdict_tags = {k: v for k, v in top.items() if k.startswith("verdict/cpt/")}
    assert verdict_tags and set(verdict_tags.values()) <= set(
        ["yes", "no", "reversed", "equivalent", "not resolved", "not comparable"]
    )
    assert top["recommendation/cpt"] == tracking._headline(d / "report.html")["cpt"]["recommendation"] != ""
