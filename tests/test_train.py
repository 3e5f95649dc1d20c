"""The training loop: schedules, data order, loss falls, checkpoints, cooldown branches, resume after kill -9,
COMPLETE semantics, errors, 2 processes (slow) and the embedded model (integration).

Runs use the tiny model with seq_len 16 x batch 4 = 64 tokens per step, so each step is milliseconds of work.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_code_corpus

from lorascope.config import RunConfig, TrainConfig, load_run_config
from lorascope.errors import ConfigError, LorascopeError
from lorascope.models import find_checkpoint, list_checkpoints, load_model
from lorascope.study import config as studyconfig
from lorascope.train import runlog
from lorascope.train.loop import train
from lorascope.train.plan import Plan
from lorascope.train.schedules import branch_multiplier, multiplier

REPO = Path(__file__).resolve().parents[1]
TPS = 64  # tokens per step in these tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_code_corpus(tmp_path_factory.mktemp("data"), n=40, repeat=4)


def _cfg(model_dir, corpus, kind="lora", **train):
    t = dict(seq_len=16, batch_size=4, max_tokens=12 * TPS, lr=1e-2, save_state_every=4)
    t.update(train)
    return RunConfig(
        model=str(model_dir), data={"dataset": str(corpus)}, method={"kind": kind, "rank": 4, "dropout": 0.0}, train=t
    )


def _curve(run, key="loss"):
    return [r[key] for r in runlog.read_loss(run / "loss.jsonl")]


def _overrides(cfg):
    t = cfg.train
    return [
        f"model={cfg.model}",
        f"data.dataset={cfg.data.dataset}",
        f"method.rank={cfg.method.rank}",
        f"method.dropout={cfg.method.dropout}",
        f"train.seq_len={t.seq_len}",
        f"train.batch_size={t.batch_size}",
        f"train.max_tokens={t.max_tokens}",
        f"train.lr={t.lr}",
        f"train.save_state_every={t.save_state_every}",
    ]


# --------------------------------------------------------------------------------------------- pure logic


def test_schedule_shapes():
    w = multiplier("wsd", 100, 10, cooldown_frac=0.2, min_ratio=0.01)
    assert [w(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup
    assert all(w(s) == 1.0 for s in range(10, 80))  # stable
    tail = [w(s) for s in range(80, 100)]
    assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] == pytest.approx(0.01)  # linear cooldown
    assert tail[0] - tail[1] == pytest.approx(tail[-2] - tail[-1])
    c = multiplier("cosine", 100, 10, min_ratio=0.1)
    vals = [c(s) for s in range(10, 100)]
    assert all(a > b for a, b in zip(vals, vals[1:])) and vals[-1] == pytest.approx(0.1)
    assert c(54) == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)  # half way: midpoint
    k = multiplier("constant", 100, 5)
    assert [k(s) for s in (0, 4, 5, 99)] == pytest.approx([0.2, 1.0, 1.0, 1.0])
    assert multiplier("wsd", 10, 0)(0) == 1.0  # no warmup
    # a budget-40 branch of a 100-step wsd: stable like the main run until 32, then decays to min at step 39
    b = branch_multiplier(w, 40, 0.2, 0.01)
    assert [b(s) for s in (5, 31)] == [w(5), 1.0] and b(32) < 1.0 and b(39) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        multiplier("linear", 10, 1)


def test_plan_budget_and_data_order():
    t = TrainConfig(seq_len=16, batch_size=4, grad_accum=2, max_tokens=1000, checkpoints=[256, 512], seed=3)
    p = Plan(t, n_rows=50)
    assert p.total == 8 and p.steps_per_epoch == 6  # ceil(1000 / 128); 50 // 8
    assert p.checkpoints == {2: ("tokens", 256), 4: ("tokens", 512), 8: ("tokens", 1000)}
    assert p.name(8) == "tok-000000001000"
    epoch0 = [i for s in range(6) for i in p.rows(s)]
    assert len(set(epoch0)) == 48 and epoch0 == [i for s in range(6) for i in Plan(t, 50).rows(s)]
    assert p.rows(6) != p.rows(0)  # the next epoch is another permutation
    assert Plan(t.model_copy(update={"seed": 4}), 50).rows(0) != p.rows(0)
    ift = Plan(TrainConfig(batch_size=4, epochs=3, checkpoints=[1, 2], max_tokens=None), n_rows=10)
    assert ift.total == 6 and ift.checkpoints == {2: ("epoch", 1), 4: ("epoch", 2), 6: ("epoch", 3)}
    with pytest.raises(LorascopeError, match="data.dataset: only 3 sequences"):
        Plan(t, n_rows=3)
    with pytest.raises(ConfigError, match="train.cooldown_per_checkpoint"):
        Plan(TrainConfig(schedule="cosine", cooldown_per_checkpoint=True), n_rows=100)


# --------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("budget", [dict(epochs=2, checkpoints=[1]), dict(max_tokens=6 * TPS, checkpoints=[3 * TPS])])
def test_study_schedules_evals_on_the_checkpoints_a_run_writes(tiny_model_dir, corpus, tmp_path, budget):
    """A CPT run (packed code) budgeted in epochs names its checkpoints epoch-NNN: the study, which must know the
    names before training, has to agree (it used to derive them from the data regime and expect tok-...)."""
    cfg = _cfg(tiny_model_dir, corpus, **budget)
    cfg.data.max_docs = 3
    assert cfg.data.regime == "cpt"
    run = train(cfg, tmp_path / "run", progress=False)
    written = [c.path.name for c in list_checkpoints(run)]
    assert len(written) == 2 and written == studyconfig.checkpoint_names(cfg)


def test_lora_learns_checkpoints_and_complete(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus, checkpoints=[4 * TPS, 8 * TPS], warmup_frac=0.25)
    run = train(cfg, tmp_path / "lora", progress=False)
    losses = _curve(run)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert _curve(run, "step") == list(range(1, 13)) and _curve(run, "tokens")[-1] == 12 * TPS
    assert _curve(run, "lr")[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])  # 3 warmup steps
    names = [c.path.name for c in list_checkpoints(run)]
    assert names == ["tok-000000000256", "tok-000000000512", "tok-000000000768"]
    meta = json.loads((run / "checkpoints" / names[0] / "lorascope.json").read_text())
    assert meta["tokens"] == 256 and meta["step"] == 4 and meta["method"]["rank"] == 4 and meta["lr"] == 1e-2
    s = json.loads((run / "summary.json").read_text())
    assert s["tokens"] == 768 and s["trainable_parameters"] < s["total_parameters"] and s["processes"] == 1
    assert s["checkpoint_size_bytes"] > 0 and s["peak_memory_bytes"] > 0 and s["final_loss"] == losses[-1]
    m = json.loads((run / "meta.json").read_text())
    assert m["torch"] == torch.__version__ and m["data_manifest_hash"] and len(m["sessions"]) == 1
    assert (run / "COMPLETE").exists() and not (run / "state").exists()
    assert runlog.read_config(run / "config.yaml") == json.loads(cfg.model_dump_json())
    model, _ = load_model(f"{run}:tok-000000000512")
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 49152)
    # a finished run is returned as is, not retrained
    stamp = (run / "COMPLETE").stat().st_mtime_ns
    assert train(cfg, run, progress=False) == run and (run / "COMPLETE").stat().st_mtime_ns == stamp
    # another config in the same directory is refused, naming the field
    cfg.train.lr = 5e-3
    with pytest.raises(LorascopeError, match=r"different config \(train.lr: 0.01 != 0.005\)"):
        train(cfg, run, progress=False)


def test_dry_run_plans_what_train_does(tiny_model_dir, corpus, tmp_path, monkeypatch):
    """--dry-run trains nothing and writes nothing; its numbers are those the real run then has."""
    from typer.testing import CliRunner

    from lorascope.cli import app
    from lorascope.train.estimate import dry_run

    cfg = _cfg(tiny_model_dir, corpus, checkpoints=[4 * TPS, 8 * TPS], cooldown_per_checkpoint=True, warmup_frac=0)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        app,
        [
            "train",
            os.devnull,
            *_overrides(cfg),
            f"train.checkpoints=[{4 * TPS},{8 * TPS}]",
            "train.cooldown_per_checkpoint=true",
            "train.warmup_frac=0",
            "--dry-run",
        ],
    )
    assert r.exit_code == 0, r.output[-2000:]
    assert list(tmp_path.iterdir()) == []
    plan = dry_run(cfg, measure_steps=1)
    run = train(cfg, tmp_path / "run", progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert (plan["steps"], plan["tokens"], plan["tokens_processed"], plan["trainable_parameters"]) == (
        summary["steps"],
        summary["tokens"],
        summary["tokens_processed"],
        summary["trainable_parameters"],
    )
    assert plan["tokens_processed"] > plan["tokens"]  # the two cooldown branches re-train tokens
    assert [c["name"] for c in plan["checkpoints"]] == [c.path.name for c in list_checkpoints(run)]
    assert plan["measured"]["steps"] == 1 and plan["measured"]["tokens_per_s"] > 0
    pace_s = plan["tokens_processed"] / plan["measured"]["tokens_per_s"]
    assert plan["estimated_s"] == pytest.approx(pace_s + plan["measured"]["first_steps_extra_s"], rel=1e-3)
    for line in (
        f"steps         {plan['steps']} ",
        f"tokens/step   {TPS} ",
        f"tokens        {plan['tokens']} ",
        ", ".join(f"{c['name']} (step {c['step']})" for c in plan["checkpoints"]),
        f"trainable     {plan['trainable_parameters']:,} of",
        "2 training steps of this model and method on this machine",
    ):
        assert line in r.stdout, (line, r.stdout)
    r = CliRunner().invoke(app, ["train", os.devnull, *_overrides(cfg)])
    assert r.exit_code == 2 and "error: --out: the run directory is required" in r.stderr


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("train-*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_plan_what_their_header_says(path):
    """Each shipped run config loads through the real loader and planner (embedded model, shipped data), and the
    cost its header quotes is the plan's: so the "minutes" a new user is promised are computed, not guessed."""
    from lorascope.train.estimate import dry_run

    cfg = load_run_config(path)
    plan = dry_run(cfg, measure_steps=0)
    header = "".join(line[1:] for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    quoted = re.search(
        r"Cost, from --dry-run: (\d+) steps, ([\d,]+) tokens, checkpoints (.+?)\. Measured", header, re.S
    )
    assert quoted, f"{path.name}: header lacks the dry-run cost line"
    assert (int(quoted[1]), int(quoted[2].replace(",", ""))) == (plan["steps"], plan["tokens"])
    names = re.findall(r"(?:tok|epoch)-\d+", quoted[3])
    assert names == [c["name"] for c in plan["checkpoints"]] == studyconfig.checkpoint_names(cfg)
    assert plan["tokens"] <= 32_768  # minutes on a 2-core CPU at ~100 tokens/s, not hours


def test_full_lion_accumulation_cosine(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        corpus,
        kind="full",
        lr=3e-4,
        optimizer="lion",
        schedule="cosine",
        batch_size=2,
        grad_accum=2,
        max_tokens=8 * TPS,
        warmup_frac=0.25,
        weight_decay=0.1,
    )
    run = train(cfg, tmp_path / "full", progress=False)
    losses, lrs = _curve(run), _curve(run, "lr")
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    assert lrs[:2] == pytest.approx([1.5e-4, 3e-4]) and lrs[-1] == pytest.approx(3e-6)  # cosine to 1%
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    ck = find_checkpoint(run)
    assert ck.kind == "full" and ck.tokens == 8 * TPS and (ck.path / "tokenizer_config.json").exists()


def test_accumulation_matches_one_big_batch_and_bf16_runs(tiny_model_dir, corpus, tmp_path):
    big = train(_cfg(tiny_model_dir, corpus, max_tokens=3 * TPS), tmp_path / "big", progress=False)
    acc = train(
        _cfg(tiny_model_dir, corpus, max_tokens=3 * TPS, batch_size=2, grad_accum=2), tmp_path / "acc", progress=False
    )
    # same rows per optimizer step and a token-weighted loss: 2 x 2 accumulates to the 4-row step
    assert _curve(acc) == pytest.approx(_curve(big), abs=1e-5)
    assert _curve(acc, "grad_norm") == pytest.approx(_curve(big, "grad_norm"), rel=1e-4)
    bf = train(_cfg(tiny_model_dir, corpus, max_tokens=2 * TPS, precision="bf16"), tmp_path / "bf16", progress=False)
    assert json.loads((bf / "summary.json").read_text())["precision"] == "bf16"
    assert _curve(bf)[0] == pytest.approx(_curve(big)[0], abs=0.05) and _curve(bf)[0] != _curve(big)[0]


def test_cooldown_branch_leaves_main_run_untouched(tiny_model_dir, corpus, tmp_path):
    # 15 steps; the checkpoint at 640 tokens = step 10 gets a branch decaying over steps 8, 9 (its last 20%)
    kw = dict(max_tokens=15 * TPS, warmup_frac=0.0, cooldown_frac=0.2, min_lr_ratio=0.01)
    run = train(
        _cfg(tiny_model_dir, corpus, checkpoints=[10 * TPS], cooldown_per_checkpoint=True, **kw),
        tmp_path / "branch",
        progress=False,
    )
    plain = train(_cfg(tiny_model_dir, corpus, **kw), tmp_path / "plain", progress=False)
    # the main trajectory equals a run without intermediate branches (the branch state is restored)
    assert _curve(run) == pytest.approx(_curve(plain), abs=1e-6)
    assert _curve(run, "lr") == _curve(plain, "lr")
    meta = json.loads((find_checkpoint(run, "tok-000000000640").path / "lorascope.json").read_text())
    cd = meta["cooldown"]
    assert meta["step"] == 10 and cd["from_step"] == 8
    # the branch's LR decays linearly to min_lr_ratio x lr at the budget; the main run is still stable there
    assert cd["lr"] == pytest.approx([1e-2 * 0.505, 1e-2 * 0.01]) and _curve(run, "lr")[8:10] == [1e-2, 1e-2]
    assert cd["loss"][0] == pytest.approx(_curve(plain)[8], abs=1e-6)  # same weights, same rows at step 8
    assert cd["loss"][1] != pytest.approx(_curve(plain)[9], abs=1e-6)  # ... then a different update
    s = json.loads((run / "summary.json").read_text())
    assert s["tokens"] == 15 * TPS and s["tokens_processed"] == 17 * TPS


def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus, max_tokens=16 * TPS, save_state_every=3)
    cfg.method.dropout = 0.1  # dropout masks come from the RNG: resume must restore it
    env = {**os.environ, "LORASCOPE_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorascope", "train", os.devnull, *_overrides(cfg), "--out", str(tmp_path / "cut")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loss_file, deadline = tmp_path / "cut" / "loss.jsonl", time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if loss_file.exists() and len(loss_file.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    cut = tmp_path / "cut"
    assert not (cut / "COMPLETE").exists()
    assert any((cut / d / "progress.json").exists() for d in ("state", "state.tmp"))
    assert 6 <= len(_curve(cut)) < 16
    # the same command again (in this process, to save an interpreter start-up): resumes from RUN/state
    from typer.testing import CliRunner

    from lorascope.cli import app

    r = CliRunner().invoke(app, cmd[3:])
    assert r.exit_code == 0, r.output[-2000:]
    ref = train(cfg, tmp_path / "ref", progress=False)  # uninterrupted, also on 1 thread
    a, b = _curve(ref), _curve(cut)
    assert len(a) == len(b) == 16 and _curve(cut, "step") == list(range(1, 17))
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    assert json.loads((cut / "summary.json").read_text())["sessions"] == 2


def test_failed_run_has_no_complete_and_bad_state_is_named(tiny_model_dir, corpus, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, corpus, max_tokens=4 * TPS, save_state_every=2)

    def boom():
        raise RuntimeError("disk full")

    monkeypatch.setattr(runlog, "peak_memory_bytes", boom)  # fails after the last step, before the summary
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg, tmp_path / "r", progress=False)
    run = tmp_path / "r"
    assert not (run / "COMPLETE").exists() and (run / "state" / "progress.json").exists()
    monkeypatch.undo()
    (run / "state" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LorascopeError, match=r"model.safetensors: unreadable training state"):
        train(cfg, run, progress=False)
    assert not (run / "COMPLETE").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("method.targets=[nope_proj]", "method.targets: module 'nope_proj' not found"),
        ("method.rank=0", "method.rank: must be >= 1"),
        ("train.cooldown_per_checkpoint=true", "train.cooldown_per_checkpoint"),  # with the default epochs=None, wsd
        ("data.dataset=missing.jsonl", "missing.jsonl"),
    ],
)
def test_cli_errors_one_line_nonzero_nothing_finished(tiny_model_dir, corpus, tmp_path, override, needle):
    from typer.testing import CliRunner

    from lorascope.cli import app

    cfg = _cfg(tiny_model_dir, corpus, max_tokens=4 * TPS)
    if "cooldown" in override:
        override = "train.schedule=cosine " + override
    out = tmp_path / "bad"
    r = CliRunner().invoke(app, ["train", os.devnull, *_overrides(cfg), *override.split(), "--out", str(out)])
    assert r.exit_code == 2, r.output
    # one error line, the last one (transformers' weight-loading bar may precede it)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0] and needle in errors[0], r.stderr
    assert not (out / "COMPLETE").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "content", [b"not a model at all", b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 12], ids=["no-magic", "truncated"]
)
def test_a_file_named_gguf_that_is_not_one_is_one_error_line(tmp_path, monkeypatch, content):
    from typer.testing import CliRunner

    from lorascope.cli import app

    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.Q4_K_M.gguf"
    bad.write_bytes(content)
    r = CliRunner().invoke(app, ["model", "info", str(bad)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and "GGUF" in lines[0], r.stderr
    assert not list((tmp_path / "cache").rglob("DONE"))


# --------------------------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus, max_tokens=8 * TPS)
    one = train(cfg, tmp_path / "one", progress=False)
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu-gloo-2proc.yaml"),
        "-m",
        "lorascope",
        "train",
        os.devnull,
        *_overrides(cfg),
        "--out",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    a, b = _curve(one), _curve(two)
    # gradients are all-reduced in another summation order: equal up to float32 rounding
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)  # measured ~1e-6
    assert _curve(one, "grad_norm") == pytest.approx(_curve(two, "grad_norm"), rel=1e-3)


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.integration
@pytest.mark.timeout(3600)  # 8 steps of 1,024 tokens: ~1-2 min on an idle 2-core CPU, far more on a busy one
@pytest.mark.parametrize("kind,lr", [("full", 5e-5), ("lora", 5e-4)])
def test_embedded_model_code_cpt(kind, lr, tmp_path, monkeypatch):
    """8,192 tokens of code CPT on SmolLM2-135M: the loss on the first training batch falls; the checkpoint
    reloads (LoRA: through peft, and merged through transformers) with the logits the trained in-memory model
    had when it was saved."""
    from lorascope.data import load_dataset
    from lorascope.train import methods

    cfg = RunConfig(
        model="embedded",
        data={"dataset": "code-cpt"},
        method={"kind": kind, "rank": 16, "targets": "all"},
        train={"seq_len": 256, "batch_size": 4, "max_tokens": 8192, "lr": lr, "warmup_frac": 0.25},
    )
    base, tok = load_model("embedded")
    data = load_dataset(cfg.data, tok, 256, "train")
    first = {k: torch.stack([data[i][k] for i in Plan(cfg.train, len(data)).rows(0)]) for k in data[0]}
    probe = first["input_ids"][:1, :32]
    with torch.no_grad():
        base_loss = base.eval()(**first).loss.item()
    seen = {}
    real_save = methods.save_checkpoint

    def spy(model, m, path, *a, **kw):  # the very model object being saved
        was = model.training
        model.eval()
        with torch.no_grad():
            seen[Path(path).name] = (model(input_ids=probe).logits.float(), model(**first).loss.item())
        model.train(was)
        return real_save(model, m, path, *a, **kw)

    monkeypatch.setattr(methods, "save_checkpoint", spy)
    run = train(cfg, tmp_path / kind, progress=False)
    assert len(_curve(run)) == 8
    ck = find_checkpoint(run)
    want, tuned_loss = seen[ck.path.name]
    assert tuned_loss < base_loss - 0.01, (base_loss, tuned_loss)
    if kind == "full":
        with torch.no_grad():
            got = load_model(str(run))[0].eval()(input_ids=probe).logits
        assert (got - want).abs().max().item() < 1e-4
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(base, str(ck.path)).eval()
    with torch.no_grad():
        assert (peft_model(input_ids=probe).logits - want).abs().max().item() < 1e-4
        merged_dir = tmp_path / "merged"
        peft_model.merge_and_unload().save_pretrained(merged_dir)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        assert (merged(input_ids=probe).logits - want).abs().max().item() < 1e-4


def test_peak_memory_is_this_runs_not_the_process_lifetime():
    """A study worker runs job after job: a small run after a big allocation must report its own peak."""
    import numpy as np

    big = np.ones(600 * 2**20 // 8)  # ~600 MiB touched
    big[::512] = 2.0
    after_big = runlog.peak_memory_bytes()
    del big
    runlog.reset_peak_memory()
    assert runlog.peak_memory_bytes() < after_big - 400 * 2**20
