"""Benchmark: training throughput and peak memory, lorascope's loop vs a plain HF Trainer + PEFT script.

Compares, on the embedded model (SmolLM2-135M), code-cpt rows of seq 256, batch 4, AdamW, fp32, grad clip 1.0:
    full fine-tuning, LoRA r=16 and LoRA r=256 (alpha=2r, dropout 0.05, all 7 block projections)
each trained for WARMUP + STEPS optimizer steps by
    lorascope.train.train (the project's loop: accelerate, run record, state saves)
    vs transformers.Trainer on the same model/adapter and the same tokenised rows (the peer),
each in its own subprocess so peak RSS is per configuration. tokens/s is timed over the STEPS after WARMUP
(model loading, the first steps and the final save are excluded in both). Ratio = lorascope / peer.

    python bench/train_throughput.py [--steps 6] [--warmup 2] [--only lora-r16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ, BATCH, LR = 256, 4, {"full": 2e-5, "lora-r16": 2e-4, "lora-r256": 1e-4}
METHODS = ("full", "lora-r16", "lora-r256")


def _rank(method: str) -> int | None:
    return None if method == "full" else int(method.split("-r")[1])


def worker_lorascope(method: str, steps: int, warmup: int, tmp: Path) -> dict:
    from lorascope.config import RunConfig
    from lorascope.train import train

    r = _rank(method)
    cfg = RunConfig(model="embedded", data={"dataset": "code-cpt"},
                    method={"kind": "full"} if r is None else {"kind": "lora", "rank": r, "targets": "all"},
                    train={"seq_len": SEQ, "batch_size": BATCH, "max_tokens": (steps + warmup) * SEQ * BATCH,
                           "lr": LR[method], "schedule": "constant", "warmup_frac": 0.0,
                           "save_state_every": 10_000})
    run = train(cfg, tmp / "run", progress=False)
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    dt = rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
    s = json.loads((run / "summary.json").read_text())
    return {"tokens_per_s": steps * SEQ * BATCH / dt, "trainable": s["trainable_parameters"],
            "final_loss": rows[-1]["loss"]}


def worker_trainer(method: str, steps: int, warmup: int, tmp: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from lorascope.config import DataConfig
    from lorascope.data import load_dataset
    from lorascope.models import load_base

    model, tok = load_base("embedded")
    r = _rank(method)
    if r is not None:
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    data = load_dataset(DataConfig(dataset="code-cpt"), tok, SEQ, "train")
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.time())

    args = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=BATCH, max_steps=steps + warmup,
                             learning_rate=LR[method], lr_scheduler_type="constant", optim="adamw_torch",
                             adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[Clock()])
    out = trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": steps * SEQ * BATCH / (marks[-1] - marks[warmup - 1]), "trainable": trainable,
            "final_loss": float(out.training_loss), "threads": torch.get_num_threads()}


def run_worker(impl: str, method: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, method, "--steps", str(steps), "--warmup", str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{impl} {method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=METHODS, default=None)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (timing starts at the end of a warmup step)")
    if args.worker:
        impl, method = args.worker
        with tempfile.TemporaryDirectory() as d:
            fn = worker_lorascope if impl == "lorascope" else worker_trainer
            res = fn(method, args.steps, args.warmup, Path(d))
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(res))
        return

    print(f"seq {SEQ} x batch {BATCH}, {args.warmup} warmup + {args.steps} timed steps, fp32, AdamW; "
          "each cell its own subprocess")
    print(f"{'method':10} {'trainable':>11} {'lorascope tok/s':>16} {'trainer tok/s':>14} {'ratio':>6} "
          f"{'lorascope RSS':>14} {'trainer RSS':>12} {'ratio':>6}")
    for method in [args.only] if args.only else METHODS:
        a = run_worker("lorascope", method, args.steps, args.warmup)
        b = run_worker("trainer", method, args.steps, args.warmup)
        gib = 2 ** 30
        print(f"{method:10} {a['trainable']:>11,} {a['tokens_per_s']:>16.1f} {b['tokens_per_s']:>14.1f} "
              f"{a['tokens_per_s'] / b['tokens_per_s']:>6.2f} {a['peak_rss_bytes'] / gib:>12.2f}Gi "
              f"{b['peak_rss_bytes'] / gib:>10.2f}Gi {a['peak_rss_bytes'] / b['peak_rss_bytes']:>6.2f}", flush=True)
        if a["trainable"] != b["trainable"]:
            print(f"  note: trainable parameters differ ({a['trainable']} vs {b['trainable']})")


if __name__ == "__main__":
    main()
