"""What a run will cost, before it runs: ``lorascope train CONFIG --dry-run``.

    report = dry_run(cfg)          # plan numbers + tokens/s measured on this machine + estimated time
    print(format_dry_run(report))

The estimate is measured, not guessed: the run is set up exactly as ``train`` does (same model, method, data,
optimizer), one untimed warm-up step runs, then ``measure_steps`` timed steps. Nothing is written (a temporary
directory holds what the setup needs); loading the model and data, evaluation and checkpoint saves are not
part of the estimate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lorascope.config import RunConfig


def dry_run(cfg: RunConfig, measure_steps: int = 2) -> dict:
    """The run's plan (trainplan.Plan.describe), parameter counts and, if measure_steps > 0, its measured pace
    and the estimated training time (tokens_processed / measured tokens per second)."""
    from lorascope.train.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="lorascope-dry-run-") as work:
        trainer = Trainer.setup(cfg, Path(work))
        report = {
            "model": cfg.model,
            "method": cfg.method.label(),
            "dataset": cfg.data.dataset,
            "seq_len": cfg.train.seq_len,
            "batch_size": cfg.train.batch_size,
            "grad_accum": cfg.train.grad_accum,
            **trainer.plan.describe(),
            "trainable_parameters": trainer.n_trainable,
            "total_parameters": trainer.n_total,
        }
        if measure_steps > 0:
            m = report["measured"] = measure(trainer, measure_steps)
            report["estimated_s"] = report["tokens_processed"] / m["tokens_per_s"]
            # On a shared machine the wall pace says more about the neighbours than about the run: the CPU time
            # the steps took, spread over this process's threads, is what they would take with the cores free.
            report["estimated_free_cores_s"] = report["tokens_processed"] / m["tokens_per_s_free_cores"]
    return report


def measure(trainer, steps: int) -> dict:
    """Time `steps` optimizer steps of the real loop after one warm-up step (first-call allocations and
    kernel selection are not the steady pace). Wall and process CPU seconds both, since machines are shared."""
    total, tps = trainer.plan.total, trainer.t.tokens_per_step
    trainer.run_step(0, trainer.lr_mult(0))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for s in range(1, steps + 1):
        trainer.run_step(s % total, trainer.lr_mult(s % total))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "steps": steps,
        "warmup_steps": 1,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "tokens_per_s": round(steps * tps / wall, 1),
        "threads": torch.get_num_threads(),
        "tokens_per_s_free_cores": round(steps * tps * torch.get_num_threads() / max(cpu, 1e-9), 1),
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_dry_run(r: dict) -> str:
    """The dry-run report as the lines the command prints."""
    cks = ", ".join(f"{c['name']} (step {c['step']})" for c in r["checkpoints"])
    extra = r["tokens_processed"] - r["tokens"]
    lines = [
        f"plan: {r['method']} on {r['dataset']} ({r['model']}); nothing trained, nothing written",
        f"  steps         {r['steps']:,} ({r['epochs']} epochs of {r['steps_per_epoch']:,} steps; "
        f"{r['rows']:,} rows of {r['seq_len']} tokens)",
        f"  tokens/step   {r['tokens_per_step']:,} (seq_len {r['seq_len']} x batch {r['batch_size']} "
        f"x grad_accum {r['grad_accum']})",
        f"  tokens        {r['tokens']:,}" + (f" (+{extra:,} re-trained by cooldown branches)" if extra else ""),
        f"  checkpoints   {cks}",
        f"  trainable     {r['trainable_parameters']:,} of {r['total_parameters']:,} parameters "
        f"({100 * r['trainable_parameters'] / r['total_parameters']:.2f}%)",
    ]
    m = r.get("measured")
    if m:
        lines += [
            f"  measured      {m['tokens_per_s']:,.1f} tokens/s: {m['steps']} training steps of this model "
            f"and method on this machine ({m['threads']} threads, after {m['warmup_steps']} warm-up step; "
            f"{m['wall_s']:.2f} s wall, {m['cpu_s']:.2f} s CPU)",
            f"  estimate      {_duration(r['estimated_s'])} of training at that pace; "
            f"{_duration(r['estimated_free_cores_s'])} if the {m['threads']} threads had their cores to "
            "themselves (from the CPU time; model/data loading, saves and evaluation not included)",
        ]
    return "\n".join(lines)
