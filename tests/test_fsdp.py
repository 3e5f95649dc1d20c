"""Sharded training: FSDP2 through `accelerate launch` with configs/accelerate/fsdp-cpu-2proc.yaml, 2 CPU processes
over gloo. The loss follows the 1-process run, the optimizer state is sharded, checkpoints load through
transformers / PEFT with the logits of the 1-process model, and a run killed with SIGKILL resumes from its
sharded state onto the uninterrupted curve."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import processes_naming, write_code_corpus

from lorascope.config import RunConfig
from lorascope.train import runlog
from lorascope.train.loop import train

REPO = Path(__file__).resolve().parents[1]
FSDP_CPU = REPO / "configs" / "accelerate" / "fsdp-cpu-2proc.yaml"
TRAIN = {"seq_len": 32, "batch_size": 4, "max_tokens": 8 * 128, "save_state_every": 2, "checkpoints": [512]}
LR = {"full": 1e-3, "lora": 1e-2}
LOSS_TOL = 1e-5  # 1 vs 2 processes: gradients summed in another order, float32 rounding (measured ~1e-6)
LOGITS_TOL = 1e-4


def test_every_launch_config_is_tested_or_marked_untested():
    """A config under configs/accelerate/ names the test or script that runs it (which names it back), or says
    UNTESTED in its header."""
    for cfg in sorted(FSDP_CPU.parent.glob("*.yaml")):
        text = cfg.read_text()
        runners = [REPO / r for r in re.findall(r"(tests/test_\w+\.py|bench/[\w.]+\.sh)", text)]
        named_back = [r for r in runners if r.exists() and cfg.name in r.read_text()]
        assert named_back or "UNTESTED" in text, cfg.name


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_code_corpus(tmp_path_factory.mktemp("data"))


def _args(model_dir, corpus, kind: str, **train) -> list[str]:
    t = {**TRAIN, "lr": LR[kind], **train}
    # no LoRA dropout: its masks depend on how rows are split between processes
    return [
        f"model={model_dir}",
        f"data.dataset={corpus}",
        f"method.kind={kind}",
        "method.rank=4",
        "method.dropout=0.0",
        *(f"train.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in t.items()),
    ]


def _launch(args: list[str], out: Path) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(FSDP_CPU),
        "-m",
        "lorascope",
        "train",
        os.devnull,
        *args,
        "--out",
        str(out),
    ]
    return subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _run(args: list[str], out: Path) -> Path:
    p = _launch(args, out)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-4000:]
    return out


def _curve(run: Path) -> list[float]:
    return [r["loss"] for r in runlog.read_loss(run / "loss.jsonl")]


def _final(run: Path) -> Path:
    return max((run / "checkpoints").iterdir())


def _logits(model, tok) -> torch.Tensor:
    ids = tok("def add_3(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _load(ck: Path, kind: str, base_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if kind == "full":
        return AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(ck))


@pytest.fixture(scope="module")
def fsdp_full(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    """An uninterrupted 2-process FSDP full fine-tuning run."""
    return _run(_args(tiny_model_dir, corpus, "full"), tmp_path_factory.mktemp("fsdp") / "full")


def _one_process(model_dir, corpus, kind: str, out: Path) -> Path:
    cfg = RunConfig(
        model=str(model_dir),
        data={"dataset": str(corpus)},
        method={"kind": kind, "rank": 4, "dropout": 0.0},
        train={**TRAIN, "lr": LR[kind]},
    )
    return train(cfg, out, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp_two_processes_match_one_and_checkpoints_load(kind, tiny_model_dir, corpus, tokenizer, tmp_path, request):
    two = (
        request.getfixturevalue("fsdp_full")
        if kind == "full"
        else _run(_args(tiny_model_dir, corpus, kind), tmp_path / "two")
    )
    one = _one_process(tiny_model_dir, corpus, kind, tmp_path / "one")
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    a, b = _curve(one), _curve(two)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert len(a) == len(b) == 8 and diff <= LOSS_TOL, (a, b)
    assert b[-1] < b[0] - 0.1  # it learns
    # the checkpoints rank 0 wrote from the gathered full state: the same files, the same model
    names = [sorted(p.name for p in (r / "checkpoints").iterdir()) for r in (one, two)]
    assert names[0] == names[1] and len(names[0]) == 2
    ck1, ck2 = _final(one), _final(two)
    assert sorted(p.name for p in ck2.iterdir()) == sorted(p.name for p in ck1.iterdir())
    got, want = (_logits(_load(ck, kind, tiny_model_dir), tokenizer) for ck in (ck2, ck1))
    base = _logits(_load(tiny_model_dir, "full", tiny_model_dir), tokenizer)
    dl = (got - want).abs().max().item()
    assert dl <= LOGITS_TOL and (want - base).abs().max().item() > 100 * LOGITS_TOL
    dw = _delta_w_gap(one, two)
    assert dw <= 1e-3
    print(
        f"\n{kind}: max |loss 2 proc - loss 1 proc| = {diff:.2e} (tol {LOSS_TOL}); "
        f"max |logits| diff of the reloaded checkpoints = {dl:.2e} (tol {LOGITS_TOL}); "
        f"dW relative gap = {dw:.2e}"
    )


def _delta_w_gap(one: Path, two: Path) -> float:
    """dW = W_tuned - W_base of every adapted matrix, from each run's saved checkpoint (as the spectrum analysis
    reads it): the largest ||dW_2proc - dW_1proc|| / ||dW_1proc||."""
    from lorascope.analysis.weights import iter_matrices, load_pair

    p1, p2 = load_pair(str(one)), load_pair(str(two))
    m1 = {m.name: m.delta for m in iter_matrices(p1.base, p1.tuned, only_changed=True)}
    m2 = {m.name: m.delta for m in iter_matrices(p2.base, p2.tuned, only_changed=True)}
    assert m1.keys() == m2.keys() and m1
    return max(((m2[k] - m1[k]).norm() / m1[k].norm()).item() for k in m1)


@pytest.mark.slow
def test_fsdp_resume_after_kill9_follows_the_uninterrupted_curve(fsdp_full, tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "killed"
    args = _args(tiny_model_dir, corpus, "full")
    p = _launch(args, out)
    deadline = time.time() + 300
    progress = out / "state" / "progress.json"
    while time.time() < deadline and p.poll() is None and not progress.exists():
        time.sleep(0.05)
    p.kill()  # SIGKILL to the launcher; the ranks (in sessions of their own) die with it, also by SIGKILL
    p.wait()
    deadline = time.time() + 20
    while processes_naming(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_naming(out), "a rank outlived its launcher"
    assert progress.exists() and not (out / "COMPLETE").exists(), "killed too late to test a resume"
    # the saved state is sharded: one model shard and one optimizer shard per process (DCP files)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(f.name for f in (out / "state" / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    at = json.loads(progress.read_text())["step"]
    _run(args, out)
    a, b = _curve(fsdp_full), _curve(out)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert len(a) == len(b) == 8 and diff <= 1e-6, (a, b)
    meta = json.loads((out / "meta.json").read_text())
    assert [(s["start_step"], s["processes"]) for s in meta["sessions"]] == [(0, 2), (at, 2)] and at > 0
    print(f"\nresumed from step {at}: max |loss - uninterrupted| = {diff:.2e}")


def test_bf16_sharding_reduces_gradients_and_returns_the_loss_in_fp32(monkeypatch):
    """accelerate's own bf16 FSDP2 policy reduces gradients in bf16 and casts the model's outputs, the loss
    included, to bf16 (on a GPU the logged loss moved in 2^-5 steps). Ours computes in bf16 and keeps fp32 for
    the reduction and the loss, also after accelerate applies the launch's mixed precision to the plugin."""
    from lorascope.train.sharded import fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    plugin = fsdp_plugin("bf16")
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with a plugin it is given
    p = plugin.mixed_precision_policy
    assert (p.param_dtype, p.reduce_dtype, p.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert fsdp_plugin("fp32").mixed_precision_policy is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_plugin("bf16") is None
