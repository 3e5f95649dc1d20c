"""Training throughput and peak memory: lorascope's loop vs a plain HF Trainer + PEFT script (the peer).

    python bench/train_throughput.py [--steps 6] [--warmup 2] [--methods full,r16,r256]

Same model (the embedded SmolLM2-135M), same data (code-cpt packed to seq 256), batch 4, AdamW, fp32, no
gradient checkpointing, for: full fine-tuning, LoRA r=16 and r=256 on all seven projections. Each measurement
runs in its own subprocess so peak RSS is that configuration's alone. tokens/s is measured over the steps after
the warm-up steps. Printed: absolute numbers (noisy on shared machines) and the ratio lorascope / peer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SEQ, BATCH = 256, 4
METHODS = {"full": None, "r16": 16, "r256": 256}


def _setup(method: str):
    import torch

    from lorascope.config import DataConfig, MethodConfig
    from lorascope.data import load_dataset
    from lorascope.models import load_base

    torch.manual_seed(0)
    model, tok = load_base("embedded")
    ds = load_dataset(DataConfig(dataset="code-cpt"), tok, SEQ)
    m = MethodConfig(kind="full") if METHODS[method] is None else MethodConfig(kind="lora", rank=METHODS[method])
    return model, tok, ds, m


def run_lorascope(method: str, steps: int, warmup: int) -> dict:
    """The real loop (lorascope.train.train), timed from its own loss.jsonl between the warm-up and the end."""
    import tempfile
    from pathlib import Path

    from lorascope.config import RunConfig
    from lorascope.train import train

    m = {"kind": "full"} if METHODS[method] is None else {"kind": "lora", "rank": METHODS[method]}
    cfg = RunConfig(model="embedded", method=m, data={"dataset": "code-cpt"},
                    train={"seq_len": SEQ, "batch_size": BATCH, "max_tokens": (warmup + steps) * SEQ * BATCH,
                           "lr": 1e-5, "schedule": "constant", "warmup_frac": 0.0, "save_state_every": 10**6})
    with tempfile.TemporaryDirectory() as d:
        train(cfg, Path(d) / "run", progress=False)
        rows = [json.loads(l) for l in (Path(d) / "run" / "loss.jsonl").read_text().splitlines()]
    dt = rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
    return {"tokens_per_s": steps * BATCH * SEQ / dt}


def run_peer(method: str, steps: int, warmup: int) -> dict:
    """What a user writes without lorascope: peft.get_peft_model + transformers.Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, _, ds, m = _setup(method)
    if m.kind == "lora":
        model = get_peft_model(model, LoraConfig(r=m.rank, lora_alpha=2 * m.rank, lora_dropout=0.05,
                                                 target_modules=m.target_modules, task_type="CAUSAL_LM"))
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["t0"] = time.perf_counter()
            if state.global_step == warmup + steps:
                marks["t1"] = time.perf_counter()

    args = TrainingArguments(output_dir="/tmp/bench-peer", per_device_train_batch_size=BATCH,
                             max_steps=warmup + steps, learning_rate=1e-5, logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             max_grad_norm=1.0, seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()]).train()
    return {"tokens_per_s": steps * BATCH * SEQ / (marks["t1"] - marks["t0"])}


def child(which: str, method: str, steps: int, warmup: int) -> None:
    res = (run_lorascope if which == "lorascope" else run_peer)(method, steps, warmup)
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default="full,r16,r256")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.steps, a.warmup)
    print(f"seq {SEQ}, batch {BATCH}, fp32, AdamW, {a.steps} timed steps after {a.warmup} warm-up, embedded model")
    print(f"{'method':8} {'lorascope tok/s':>16} {'peer tok/s':>11} {'ratio':>6} {'lorascope RSS':>14} {'peer RSS':>9}")
    for m in a.methods.split(","):
        r = {}
        for which in ("lorascope", "peer"):
            out = subprocess.run([sys.executable, __file__, "--child", which, m, "--steps", str(a.steps),
                                  "--warmup", str(a.warmup)], capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                sys.exit(f"{which} {m} failed:\n{out.stderr[-2000:]}")
            r[which] = json.loads(line[0][7:])
        lo, pe = r["lorascope"], r["peer"]
        print(f"{m:8} {lo['tokens_per_s']:16.1f} {pe['tokens_per_s']:11.1f} {lo['tokens_per_s'] / pe['tokens_per_s']:6.2f}"
              f" {lo['peak_rss_gb']:12.2f}GB {pe['peak_rss_gb']:7.2f}GB")


if __name__ == "__main__":
    main()
