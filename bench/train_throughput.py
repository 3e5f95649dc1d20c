"""Benchmark: training throughput and peak memory, lorascope's loop vs a plain HF Trainer + PEFT script.

Compares, on the embedded model (SmolLM2-135M), code-cpt rows of seq 256, batch 4, AdamW, fp32, grad clip 1.0:
    full fine-tuning, LoRA r=16 and LoRA r=256 (alpha=2r, dropout 0.05, all 7 block projections)
each trained for WARMUP + STEPS optimizer steps by
    lorascope.train.loop.train (the project's loop: accelerate, run record, state saves)
    vs transformers.Trainer on the same model/adapter and the same tokenised rows (the peer),
each in its own subprocess so peak RSS is per configuration. tokens/s is timed over the STEPS after WARMUP
(model loading, the first steps and the final save are excluded in both). Ratio = lorascope / peer. Both
loops' workers run with the allocator lorascope gives its own jobs (procenv: mimalloc preloaded, else glibc's
huge-page tunable); LORASCOPE_MALLOC=system measures both with glibc's malloc as it is.

MFU: model FLOPs per token x tokens/s over this machine's fp32 matmul peak, measured by each worker right after
its run (best of repeated 2048^2 matmuls on the same threads; a peak measured once at the start can be taken in a
slow moment of a shared machine and put MFU above 100%). FLOPs per token, recomputation not counted (PaLM's
convention): full FT 6N + 12 L d T (N: weights of every matmul incl. the tied lm_head; L layers, d attention
width, T sequence length); LoRA 4N (forward + input gradients: the frozen weights get none) + 6 N_lora +
12 L d T.

    python bench/train_throughput.py [--steps 6] [--warmup 2] [--only lora-r16] [--seq 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, LR = 4, {"full": 2e-5, "lora-r16": 2e-4, "lora-r256": 1e-4}
METHODS = ("full", "lora-r16", "lora-r256")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


SEQ = 256  # --seq sets it (and the workers inherit it through their command line)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """fp32 matmul FLOP/s of this process's threads: the best of `reps` timed n x n products into a preallocated
    output (a fresh 16 MiB output per product would time page faults, not arithmetic)."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)  # first call: thread pool start
    best = min(_timed(lambda: torch.mm(a, b, out=c)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@functools.lru_cache(maxsize=1)
def _embedded_model():
    """The embedded model, loaded once for the FLOP counts of every method."""
    from lorascope.models import load_base

    return load_base("embedded")[0]


def flops_per_token(method: str) -> float:
    """Training FLOPs per token of the embedded model under `method` (see the module docstring)."""
    import torch

    model = _embedded_model()
    c = model.config
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = (
        12
        * c.num_hidden_layers
        * c.num_attention_heads
        * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        * SEQ
    )
    r = _rank(method)
    if r is None:
        return 6 * n + attn
    lora = sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    )
    return 4 * n + 6 * lora + attn


def _rank(method: str) -> int | None:
    return None if method == "full" else int(method.split("-r")[1])


def lorascope_config(method: str, max_tokens: int, dropout: float = 0.05):
    """The RunConfig lorascope trains `method` with here (LoRA: all 7 projections, alpha 2r)."""
    from lorascope.config import RunConfig

    r = _rank(method)
    m = {"kind": "full"} if r is None else {"kind": "lora", "rank": r, "targets": "all", "dropout": dropout}
    return RunConfig(
        model="embedded",
        data={"dataset": "code-cpt"},
        method=m,
        train={
            "seq_len": SEQ,
            "batch_size": BATCH,
            "max_tokens": max_tokens,
            "lr": LR[method],
            "schedule": "constant",
            "warmup_frac": 0.0,
            "save_state_every": 10_000,
        },
    )


def worker_lorascope(method: str, steps: int, warmup: int, tmp: Path) -> dict:
    from lorascope.train.loop import train

    run = train(lorascope_config(method, (steps + warmup) * SEQ * BATCH), tmp / "run", progress=False)
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    dt = rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
    s = json.loads((run / "summary.json").read_text())
    return {
        "tokens_per_s": steps * SEQ * BATCH / dt,
        "trainable": s["trainable_parameters"],
        "final_loss": rows[-1]["loss"],
    }


def peer_trainer(method: str, max_steps: int, tmp: Path, callback):
    """transformers.Trainer on the embedded model (+ PEFT LoRA with the same adapter) and the same rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from lorascope.config import DataConfig
    from lorascope.data import load_dataset
    from lorascope.models import load_base

    model, tok = load_base("embedded")
    r = _rank(method)
    if r is not None:
        model = get_peft_model(
            model,
            LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=list(TARGETS)),
        )
    data = load_dataset(DataConfig(dataset="code-cpt"), tok, SEQ, "train")
    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        per_device_train_batch_size=BATCH,
        max_steps=max_steps,
        learning_rate=LR[method],
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=[callback]
    )


def worker_trainer(method: str, steps: int, warmup: int, tmp: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.time())

    trainer = peer_trainer(method, steps + warmup, tmp, Clock())
    out = trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "tokens_per_s": steps * SEQ * BATCH / (marks[-1] - marks[warmup - 1]),
        "trainable": trainable,
        "final_loss": float(out.training_loss),
        "threads": torch.get_num_threads(),
    }


def run_worker(impl: str, method: str, steps: int, warmup: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        method,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--seq",
        str(SEQ),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise SystemExit(f"{impl} {method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _env() -> dict:
    """Both loops' workers get the allocator lorascope gives its own jobs (procenv; LORASCOPE_MALLOC=system:
    glibc's malloc as it is)."""
    from lorascope.procenv import with_fast_malloc

    return with_fast_malloc(dict(os.environ))


def _allocator() -> str:
    env = _env()
    if env.get("LD_PRELOAD"):
        return (
            "LD_PRELOAD="
            + Path(env["LD_PRELOAD"].split(":")[0]).name
            + " "
            + " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("MIMALLOC_"))
        )
    return f"GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '(unset)')}"


def main() -> None:
    global SEQ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--only", choices=METHODS, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="alternated repetitions of every cell (median, range)")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    SEQ = args.seq
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (timing starts at the end of a warmup step)")
    if args.worker:
        impl, method = args.worker
        with tempfile.TemporaryDirectory() as d:
            fn = worker_lorascope if impl == "lorascope" else worker_trainer
            res = fn(method, args.steps, args.warmup, Path(d))
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["matmul_peak"] = matmul_peak()  # this run's own: the machine's speed drifts between runs
        print(json.dumps(res))
        return
    compare(args.only or list(METHODS), args.steps, args.warmup, args.repeats)


IMPLS = ("lorascope", "trainer")


def compare(methods: list[str], steps: int, warmup: int, repeats: int) -> None:
    """Every method by both implementations, one subprocess each, `repeats` times in alternating order (the
    machine's speed drifts by 6-12% between runs: a ratio is taken within each repetition, between neighbouring
    runs, and its median and range over the repetitions are printed); then LoRA against full FT in lorascope."""
    print(
        f"seq {SEQ} x batch {BATCH}, {warmup} warmup + {steps} timed steps, fp32, AdamW; each cell its own "
        f"subprocess, {repeats} repetition(s) in alternating order, median [min-max]; MFU against the fp32 "
        f"matmul peak each worker measures after its run; both loops' workers with {_allocator()}"
    )
    cells: dict[tuple[str, str], list[dict]] = {(m, i): [] for m in methods for i in IMPLS}
    for rep in range(repeats):
        order = [(m, i) for m in methods for i in IMPLS]
        for method, impl in order[::-1] if rep % 2 else order:
            cells[method, impl].append(run_worker(impl, method, steps, warmup))
    print(
        f"{'method':10} {'trainable':>11} {'lorascope tok/s':>22} {'trainer tok/s':>22} {'ratio':>18} "
        f"{'MFU ours':>9} {'MFU peer':>9} {'lorascope RSS':>14} {'trainer RSS':>12} {'ratio':>6}"
    )
    gib = 2**30
    for method in methods:
        fpt = flops_per_token(method)
        a, b = cells[method, "lorascope"], cells[method, "trainer"]
        ta, tb = _col(a, "tokens_per_s"), _col(b, "tokens_per_s")
        ra, rb = _col(a, "peak_rss_bytes"), _col(b, "peak_rss_bytes")
        print(
            f"{method:10} {a[0]['trainable']:>11,} {_spread(ta):>22} {_spread(tb):>22} "
            f"{_spread([x / y for x, y in zip(ta, tb)], 2):>18} {_mfu(a, fpt):>9.0%} "
            f"{_mfu(b, fpt):>9.0%} {statistics.median(ra) / gib:>12.2f}Gi {statistics.median(rb) / gib:>10.2f}Gi "
            f"{statistics.median(ra) / statistics.median(rb):>6.2f}",
            flush=True,
        )
        if a[0]["trainable"] != b[0]["trainable"]:
            print(f"  note: trainable parameters differ ({a[0]['trainable']} vs {b[0]['trainable']})")
    if "full" not in methods:
        return
    full = cells["full", "lorascope"]
    for method in [m for m in methods if m != "full"]:
        mine = cells[method, "lorascope"]
        speed = [x / y for x, y in zip(_col(mine, "tokens_per_s"), _col(full, "tokens_per_s"))]
        rss = [x / y for x, y in zip(_col(mine, "peak_rss_bytes"), _col(full, "peak_rss_bytes"))]
        print(f"lorascope {method} / full: tokens/s {_spread(speed, 2)}x, peak RSS {_spread(rss, 2)}x")


def _mfu(runs: list[dict], fpt: float) -> float:
    """Median over runs of model FLOP/s over the matmul peak that run's worker measured right after it."""
    return statistics.median([r["tokens_per_s"] * fpt / r["matmul_peak"] for r in runs])


def _col(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


def _spread(xs: list[float], digits: int = 1) -> str:
    """'median [min-max]', or the one value."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


if __name__ == "__main__":
    main()
