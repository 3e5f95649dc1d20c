"""The training loop: loss falls, checkpoints, cooldown branches, resume after kill -9, 2 processes, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lorascope.config import RunConfig
from lorascope.errors import LorascopeError
from lorascope.models import find_checkpoint, list_checkpoints, load_model
from lorascope.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = [{"text": f"def add_{i}(a, b):\n    '''Add {i}.'''\n    return a + b + {i}\n\n" * 8} for i in range(60)]
    p = tmp_path_factory.mktemp("data") / "code.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def _cfg(model_dir, corpus, **train):
    t = dict(seq_len=32, batch_size=4, max_tokens=2048, lr=1e-3, save_state_every=4)
    t.update(train)
    return RunConfig(model=str(model_dir), data={"dataset": str(corpus)},
                     method={"kind": "lora", "rank": 4, "dropout": 0.0}, train=t)


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "loss.jsonl").read_text().splitlines()]


def _cli(cfg, out, *extra):
    args = [f"model={cfg.model}", f"data.dataset={cfg.data.dataset}", "method.rank=4", "method.dropout=0.05",
            "train.seq_len=32", "train.batch_size=4", f"train.max_tokens={cfg.train.max_tokens}",
            "train.lr=1e-3", "train.save_state_every=2", *extra]
    return [sys.executable, "-m", "lorascope", "train", os.devnull, *args, "--out", str(out)]


def test_lora_and_full_learn_and_checkpoint(tiny_model_dir, corpus, tmp_path):
    for kind, lr in (("lora", 1e-2), ("full", 1e-3)):
        cfg = _cfg(tiny_model_dir, corpus, lr=lr, checkpoints=[512, 1024], max_tokens=2048)
        cfg.method.kind = kind
        run = train(cfg, tmp_path / kind, progress=False)
        losses = _losses(run)
        assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, (kind, losses)
        names = [c.path.name for c in list_checkpoints(run)]
        assert names == ["tok-000000000512", "tok-000000001024", "tok-000000002048"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["tokens"] == 2048 and summary["trainable_parameters"] > 0
        assert (run / "COMPLETE").exists() and (run / "data_manifest.json").exists()
        model, _ = load_model(f"{run}:tok-000000001024")
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0
    # a finished run is not retrained; another config in the same dir is refused
    assert train(cfg, tmp_path / "full", progress=False) == tmp_path / "full"
    cfg.train.lr = 5e-4
    with pytest.raises(LorascopeError, match="different config"):
        train(cfg, tmp_path / "full", progress=False)


def test_cooldown_branches(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus, checkpoints=[1024], max_tokens=2048, cooldown_per_checkpoint=True,
               warmup_frac=0.0)
    run = train(cfg, tmp_path / "b", progress=False)
    plain = train(_cfg(tiny_model_dir, corpus, max_tokens=2048, warmup_frac=0.0), tmp_path / "p", progress=False)
    # the main trajectory is untouched by the branch: same curve as a run without intermediate checkpoints
    assert _losses(run) == pytest.approx(_losses(plain), abs=1e-6)
    ck = find_checkpoint(run, "tok-000000001024")
    assert ck.step == 8
    # checkpoint 1024 came from a branch whose LR decayed over steps 6-8, so it differs from the weights the
    # main (stable-LR) trajectory had at step 8
    nob = train(_cfg(tiny_model_dir, corpus, checkpoints=[1024], max_tokens=2048, warmup_frac=0.0),
                tmp_path / "n", progress=False)
    assert _losses(nob) == pytest.approx(_losses(plain), abs=1e-6)
    wb = load_model(f"{run}:tok-000000001024", merge=True)[0].state_dict()
    wn = load_model(f"{nob}:tok-000000001024", merge=True)[0].state_dict()
    wp = load_model(str(tiny_model_dir))[0].state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    moved_branch, moved_main = (wb[k] - wp[k]).norm(), (wn[k] - wp[k]).norm()
    assert 0 < moved_branch < moved_main  # lower LR over the last 20% -> a smaller step away from the base


def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus, max_tokens=6144)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    env = {**os.environ, "LORASCOPE_THREADS": "1"}
    subprocess.run(_cli(cfg, ref), check=True, env=env, capture_output=True)
    p = subprocess.Popen(_cli(cfg, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        f = cut / "loss.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= 15:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cut / "COMPLETE").exists()
    subprocess.run(_cli(cfg, cut), check=True, env=env, capture_output=True)
    a, b = _losses(ref), _losses(cut)
    assert len(a) == len(b) == 48
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


@pytest.mark.parametrize("override,needle", [
    ("method.targets=[nope_proj]", "method.targets"),
    ("method.rank=0", "method.rank"),
    ("train.lr=-1", "train.lr"),
    ("data.dataset=missing.jsonl", "missing.jsonl"),
])
def test_bad_input_one_line_nonzero_nothing_finished(tiny_model_dir, corpus, tmp_path, override, needle):
    out = tmp_path / "bad"
    cmd = _cli(_cfg(tiny_model_dir, corpus), out, override)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and needle in r.stderr
    assert not (out / "COMPLETE").exists() and not list((out / "checkpoints").glob("*")) if out.exists() else True


def test_unreadable_state_is_named(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus, max_tokens=1024)
    run = train(cfg, tmp_path / "r", progress=False)
    (run / "COMPLETE").unlink()
    (run / "state" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LorascopeError, match="unreadable training state"):
        train(cfg, run, progress=False)


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tiny_model_dir, corpus)
    one = train(cfg, tmp_path / "one", progress=False)
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "lorascope", "train", os.devnull, f"model={tiny_model_dir}", f"data.dataset={corpus}",
           "method.rank=4", "method.dropout=0.0", "train.seq_len=32", "train.batch_size=4",
           "train.max_tokens=2048", "train.lr=0.001", "train.save_state_every=4", "--out", str(tmp_path / "two")]
    subprocess.run(cmd, check=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"}, capture_output=True)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a, b = _losses(one), _losses(tmp_path / "two")
    # gradients are all-reduced in another summation order: equal up to float32 rounding
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
