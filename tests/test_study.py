"""Studies: presets validate, errors name their place, a tiny study runs end to end (in-process), the shrunken
presets run, a killed study completes on re-run with the same numbers, Ray local mode runs the same graph."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorascope.errors import ConfigError, LorascopeError
from lorascope.config import apply_overrides
from lorascope.jobs import build_jobs
from lorascope.study import run_study
from lorascope.studyconfig import load_study
from lorascope.studyplan import plan_runs


def expand(study):
    return plan_runs(study, None)[0]

CONFIGS = Path(__file__).parent.parent / "configs"
PRESETS = ["quick", "paper-v2", "critique", "lr-sweep", "regularizers"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    from lorascope.evals import registry

    if name == "paper-v2" and "humaneval" not in registry.TASKS:
        pytest.skip("generation tasks (humaneval, gsm8k) are not registered in this checkout")
    study = load_study(CONFIGS / f"{name}.yaml")
    runs = expand(study)
    assert runs and len({r["run_id"] for r in runs}) == len(runs)
    jobs = build_jobs(study, runs)
    ids = {j["id"] for j in jobs}
    assert len(ids) == len(jobs) and all(d in ids for j in jobs for d in j["deps"])


def test_quick_runs_costly_groups_on_final_checkpoint_only():
    study = load_study(CONFIGS / "quick.yaml")
    jobs = [j for j in build_jobs(study, expand(study)) if j["kind"] == "eval" and j["run"]]
    finals = [j for j in jobs if j["ckpt"] == "tok-000000008192"]
    assert len(jobs) == 6 and len(finals) == 3  # 3 runs x checkpoints 4k, 8k
    assert all(j["groups"] == ([0, 1] if j in finals else [0]) for j in jobs)


def test_separate_runs_and_per_setting_lrs(tmp_path, tiny_model_dir, ift_corpus):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "settings": [{"name": "ift", "separate_runs": True, "data": {"dataset": str(ift_corpus), "regime": "ift"},
                      "train": {"max_tokens": None, "epochs": 4, "checkpoints": [1, 2]}},
                     {"name": "cpt", "data": {"dataset": str(ift_corpus), "regime": "cpt"},
                      "train": {"max_tokens": 512, "checkpoints": [256]}}],
        "methods": [{"name": "lora", "method": {"kind": "lora"}, "lrs": {"ift": [1e-4, 2e-4], "default": [3e-4]}}]}))
    runs = expand(load_study(p))
    ift = [r for r in runs if r["setting"] == "ift"]
    assert sorted((r["lr"], r["config"]["train"]["epochs"]) for r in ift) == \
        [(1e-4, 1), (1e-4, 2), (1e-4, 4), (2e-4, 1), (2e-4, 2), (2e-4, 4)]
    assert all(r["config"]["train"]["checkpoints"] == [] for r in ift) and len({r["label"] for r in ift}) == 6
    assert [(r["lr"], r["budget"]) for r in runs if r["setting"] == "cpt"] == [(3e-4, None)]
    s = yaml.safe_load(p.read_text())
    s["methods"][0]["lrs"] = {"ift": [1e-4]}
    p.write_text(yaml.safe_dump(s))
    with pytest.raises(ConfigError, match=r"methods\[0\].lrs: no learning rate for setting\(s\) \['cpt'\]"):
        load_study(p)


def test_overrides_index_lists_and_star():
    d = {"settings": [{"train": {"lr": 1}}, {"train": {"lr": 2}}], "methods": [{"lrs": [1]}, {"lrs": [2]}]}
    apply_overrides(d, ["settings.1.train.lr=3", "methods.*.lrs=[0.5]", "evals.base=false"])
    assert d == {"settings": [{"train": {"lr": 1}}, {"train": {"lr": 3}}], "methods": [{"lrs": [0.5]}] * 2,
                 "evals": {"base": False}}
    with pytest.raises(ConfigError, match=r"settings.5.train: '5' is not an index of settings"):
        apply_overrides(d, ["settings.5.train=1"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = [{"text": f"def add_{i}(a, b):\n    '''Add {i}.'''\n    return a + b + {i}\n\n" * 8} for i in range(60)]
    p = tmp_path_factory.mktemp("data") / "code.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


@pytest.fixture(scope="module")
def ift_corpus(tmp_path_factory):
    rows = [{"prompt": f"Write add_{i}.", "response": f"def add_{i}(a, b):\n    return a + b + {i}\n"}
            for i in range(40)]
    p = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def tiny_study(tmp_path, model_dir, corpus, **extra) -> Path:
    study = {
        "name": "tiny", "model": str(model_dir), "seeds": [0],
        "settings": [{"name": "cpt", "data": {"dataset": str(corpus)},
                      "train": {"seq_len": 32, "batch_size": 4, "max_tokens": 1024, "checkpoints": [512],
                                "save_state_every": 2}}],
        "methods": [{"name": "full", "method": {"kind": "full"}, "lrs": [1e-3]},
                    {"name": "lora-r4", "method": {"kind": "lora", "rank": 4}, "lrs": [1e-2]}],
        "evals": {"checkpoints": "all", "groups": [{"tasks": [f"heldout_bpb:{corpus}", "kl_base"], "limit": 4},
                                                   {"tasks": ["arc_easy"], "limit": 3}]},
        "analysis": {"spectrum": {"checkpoints": "final"}, "truncate": {"ranks": [2], "evaluate": True}},
    }
    study.update(extra)
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study))
    return p


@pytest.mark.parametrize("mutate,place", [
    (lambda s: s["methods"][1]["method"].update(rnk=4), "methods[1].method.rnk: unknown field"),
    (lambda s: s.update(methods=[]), "methods"),
    (lambda s: s["evals"]["groups"][0]["tasks"].append("mmlu"), "evals.groups[0].tasks[2]: unknown task 'mmlu'"),
    (lambda s: s["settings"][0]["train"].update(checkpoints=[512, 256]), "settings[0].train.checkpoints"),
    (lambda s: s["settings"][0]["train"].update(checkpoints=[2048]), "settings[0].train.checkpoints"),
    (lambda s: s.update(report={"forgetting": "hellaswag"}), "report.forgetting: 'hellaswag' is not evaluated"),
])
def test_invalid_study_names_the_place(tmp_path, tiny_model_dir, corpus, mutate, place):
    p = tiny_study(tmp_path, tiny_model_dir, corpus)
    s = yaml.safe_load(p.read_text())
    mutate(s)
    p.write_text(yaml.safe_dump(s))
    with pytest.raises(ConfigError) as e:
        load_study(p)
    assert str(p) in str(e.value) and place in str(e.value), str(e.value)


def _results(d: Path) -> dict:
    out = {}
    for f in sorted((d / "evals").rglob("results.json")):
        if "groups" in f.parts:
            continue
        r = json.loads(f.read_text())
        out[str(f.relative_to(d))] = {t: v["metrics"] for t, v in r["tasks"].items()}
    return out


def _job_log(d: Path) -> list[dict]:
    f = d / "logs" / "jobs.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_minimal_study_inline_and_rerun_skips(tmp_path, tiny_model_dir, corpus):
    cfg = tiny_study(tmp_path, tiny_model_dir, corpus, analysis={},
                     methods=[{"name": "lora", "method": {"kind": "lora", "rank": 2}, "lrs": [1e-2]}],
                     evals={"checkpoints": "final", "groups": [{"tasks": [f"heldout_bpb:{corpus}"], "limit": 2}]})
    d = run_study(cfg, [], tmp_path / "s", executor="inline", progress=False)
    (rid,) = [r["run_id"] for r in json.loads((d / "runs.json").read_text())]
    res = _results(d)
    assert set(res) == {"evals/base/results.json", f"evals/{rid}/tok-000000001024/results.json"}
    h = f"heldout_bpb:{corpus}"
    assert res[f"evals/{rid}/tok-000000001024/results.json"][h]["bpb"] < res["evals/base/results.json"][h]["bpb"]
    # training first (it unlocks the other jobs), then the evaluations in file order
    assert [j["job"] for j in _job_log(d)] == [f"train:{rid}", "eval:base", f"eval:{rid}:tok-000000001024"]
    run_study(cfg, [], d, executor="inline", progress=False)
    assert len(_job_log(d)) == 3  # everything done: nothing ran again
    with pytest.raises(LorascopeError, match="different study"):
        run_study(cfg, ["seeds=[1]"], d, executor="inline", progress=False)


@pytest.mark.slow
def test_tiny_study_end_to_end_inline(tmp_path, tiny_model_dir, corpus):
    methods = [{"name": "full", "method": {"kind": "full"}, "lrs": [1e-3]},
               {"name": "lora-r4", "method": {"kind": "lora", "rank": 4}, "lrs": [1e-2]},
               {"name": "full-blowup", "method": {"kind": "full"}, "lrs": [30.0]}]
    cfg = tiny_study(tmp_path, tiny_model_dir, corpus, methods=methods)
    d = run_study(cfg, [], tmp_path / "s", executor="inline", progress=False)
    runs = {r["method_name"]: r["run_id"] for r in json.loads((d / "runs.json").read_text())}
    assert {j["kind"] for j in json.loads((d / "jobs.json").read_text())} == \
        {"train", "eval", "spectrum", "truncate", "eval-trunc"}
    # the blown-up run is marked and nothing is evaluated on it
    assert (d / "runs" / runs["full-blowup"] / "DIVERGED").exists()
    assert not (d / "evals" / runs["full-blowup"]).exists()
    res = _results(d)
    assert set(res) == {"evals/base/results.json", f"evals/{runs['full']}/truncate-r2/results.json"} | {
        f"evals/{runs[m]}/tok-{b:012d}/results.json" for m in ("full", "lora-r4") for b in (512, 1024)}
    assert all(set(v) == {f"heldout_bpb:{corpus}", "kl_base", "arc_easy"} for v in res.values())
    # training lowers held-out BPB on this repetitive corpus; the base has zero KL to itself
    h = f"heldout_bpb:{corpus}"
    final = res[f"evals/{runs['full']}/tok-000000001024/results.json"]
    assert final[h]["bpb"] < res["evals/base/results.json"][h]["bpb"]
    assert res["evals/base/results.json"]["kl_base"]["kl"] == pytest.approx(0.0, abs=1e-6)
    for m in ("full", "lora-r4"):
        assert (d / "analysis" / runs[m] / "tok-000000001024" / "spectrum.json").exists()
    # per-item samples are kept beside the merged results (the report bootstraps over them)
    assert list((d / "evals" / "base" / "samples").glob("*.jsonl"))
    # a re-run finds everything done and runs nothing
    n = len(_job_log(d))
    run_study(cfg, [], d, executor="inline", progress=False)
    assert len(_job_log(d)) == n
    # a different study in the same dir is refused
    with pytest.raises(LorascopeError, match="different study"):
        run_study(cfg, ["seeds=[1]"], d, executor="inline", progress=False)


SHRINK = ["settings.*.train.seq_len=32", "settings.*.train.batch_size=2", "settings.*.train.checkpoints=[]",
          "settings.*.train.save_state_every=1000", "evals.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["critique", "lr-sweep", "regularizers"])
def test_shrunken_presets_run(tmp_path, tiny_model_dir, corpus, ift_corpus, name):
    data = ift_corpus if name == "regularizers" else corpus
    # heldout_bpb:<file> reads a file as CPT text, so the IFT preset is scored on English BPB here
    task = "english_bpb" if name == "regularizers" else f"heldout_bpb:{data}"
    over = [f"model={tiny_model_dir}", f"settings.*.data.dataset={data}", *SHRINK,
            f"evals.groups=[{{tasks: ['{task}'], limit: 2}}]"]
    if name == "regularizers":
        # the chat template alone is ~30 tokens: IFT needs room for the response
        over += ["settings.*.data.regime=ift", "settings.*.data.max_docs=8", "settings.*.train.seq_len=96"]
    else:
        over += ["settings.*.train.max_tokens=128"]
    if name == "lr-sweep":
        over += ["methods.0.lrs=[1e-3,50.0]", "methods.1.lrs=[1e-2]"]
    if name == "critique":  # rank 256 > the tiny model's width; keep the variants, shrink the rank
        over += ["methods.3.method.rank=8", "methods.4.method.rank=8", "methods.5.method.rank=8"]
    d = tmp_path / name
    failed = None
    try:
        run_study(CONFIGS / f"{name}.yaml", over, d, executor="inline", progress=False)
    except LorascopeError as e:
        failed = str(e)
    runs = json.loads((d / "runs.json").read_text())
    log = {j["job"]: j["rc"] for j in _job_log(d)}
    bad = sorted(j for j, rc in log.items() if rc != 0)
    by_id = {r["run_id"]: r["method_name"] for r in runs}
    if name == "critique" and not __import__("torch").cuda.is_available():
        # LoftQ needs a GPU: exactly that run fails (with its reason in its log), every other one completes
        assert failed and [by_id[b.split(":")[1]] for b in bad] == ["r16-loftq"]
        assert "loftq needs a CUDA GPU" in (d / "logs" / (bad[0].replace(":", "_") + ".log")).read_text()
    else:
        assert failed is None and not bad
    diverged = {by_id[p.parent.name] for p in (d / "runs").glob("*/DIVERGED")}
    assert diverged == ({"full"} if name == "lr-sweep" else set())  # lr 50 blows up, lr 1e-3 does not
    # every run either completed or is marked diverged (a run may finish with a final loss far above its first)
    done = [r for r in runs if any((d / "runs" / r["run_id"] / m).exists() for m in ("COMPLETE", "DIVERGED"))]
    assert len(done) == len(runs) - len(bad)
    assert (d / "evals" / "base" / "results.json").exists()


@pytest.mark.slow
def test_kill_and_rerun_completes_with_same_numbers(tmp_path, tiny_model_dir, corpus):
    cfg = tiny_study(tmp_path, tiny_model_dir, corpus, analysis={},
                     methods=[{"name": "lora-r4", "method": {"kind": "lora", "rank": 4}, "lrs": [1e-2]}],
                     evals={"checkpoints": "all", "groups": [{"tasks": [f"heldout_bpb:{corpus}"], "limit": 4}]})
    ref = run_study(cfg, [], tmp_path / "ref", executor="inline", progress=False)
    res = _results(ref)
    assert len(res) == 3
    # kill the whole study (its jobs die with it) in the middle of training, then run the same command again
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "lorascope", "study", str(cfg), "--out", str(cut)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cut / "runs").glob("*/state/progress.json")):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(0.3)
    assert not list((cut / "runs").glob("*/COMPLETE")), "killed too late to test a resume"
    run_study(cfg, [], cut, progress=False)
    assert _results(cut).keys() == res.keys()
    for k, v in _results(cut).items():
        for task, metrics in v.items():
            for m, x in metrics.items():
                if isinstance(x, float):
                    assert x == pytest.approx(res[k][task][m], rel=1e-4, abs=1e-6), (k, task, m)
    for run in (cut / "runs").iterdir():
        steps = [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), "a step was trained twice"


@pytest.mark.slow
def test_ray_executor_local_mode(tmp_path, tiny_model_dir, corpus):
    pytest.importorskip("ray")
    cfg = tiny_study(tmp_path, tiny_model_dir, corpus, analysis={},
                     methods=[{"name": "lora", "method": {"kind": "lora", "rank": 2}, "lrs": [1e-2]}])
    d = run_study(cfg, [], tmp_path / "ray", executor="ray", jobs=1, progress=False)
    assert len(_results(d)) == 3
