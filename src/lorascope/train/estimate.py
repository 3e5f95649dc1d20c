"""What a run will cost, before it runs: ``lorascope train CONFIG --dry-run``.

    report = dry_run(cfg)          # plan numbers + tokens/s measured on this machine + estimated time
    print(format_dry_run(report))

The estimate is measured, not guessed: the run is set up exactly as ``train`` does (same model, method, data,
optimizer), then every step is timed: a first step (first-call allocations, kernel selection), then
``measure_steps`` more. The first two steps are slower than the rest and a real run pays them too (full FT on
the embedded model: 7.1 s for the step after the first against a 5.4 s median, in ``bench/train_paired.py``;
the optimizer's state and the gradients meet fresh memory), so the estimate is those two steps as timed plus
the median of the later ones for every further step (``first_steps_extra_s``: what they took beyond that
median). Nothing is written (a temporary directory holds what the setup needs); loading the model and data,
evaluation and checkpoint saves are not part of the estimate.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorascope.config import RunConfig

FIRST_STEPS = 2  # steps timed as they are (the transient); the pace is the median of the later ones


def dry_run(cfg: RunConfig, measure_steps: int = 3) -> dict:
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
            steps = report["tokens_processed"] / trainer.t.tokens_per_step
            report["estimated_s"] = steps * trainer.t.tokens_per_step / m["tokens_per_s"] + m["first_steps_extra_s"]
            # On a shared machine the wall pace says more about the neighbours than about the run: the CPU time
            # the steps took, spread over this process's threads, is what they would take with the cores free.
            report["estimated_free_cores_s"] = (
                steps * trainer.t.tokens_per_step / m["tokens_per_s_free_cores"] + m["first_steps_extra_cpu_s"]
            )
    return report


def measure(trainer, steps: int) -> dict:
    """Time a first step and ``steps`` more of the real loop, each on its own: the steady pace is the median of
    the steps after the first FIRST_STEPS (first-call allocations and kernel selection are not it), and what
    those first steps took beyond it is kept apart, since every real run pays it once. Wall and process CPU
    seconds both, since machines are shared."""
    total, tps = trainer.plan.total, trainer.t.tokens_per_step
    walls, cpus = [], []
    for s in range(steps + 1):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        trainer.run_step(s % total, trainer.lr_mult(s % total))
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    first = min(FIRST_STEPS, len(walls) - 1)
    wall, cpu = statistics.median(walls[first:]), statistics.median(cpus[first:])
    threads = torch.get_num_threads()
    return {
        "steps": steps,
        "warmup_steps": first,
        "step_wall_s": [round(x, 3) for x in walls],
        "wall_s": round(sum(walls[1:]), 3),
        "cpu_s": round(sum(cpus[1:]), 3),
        "tokens_per_s": round(tps / wall, 1),
        "first_steps_extra_s": round(max(0.0, sum(walls[:first]) - first * wall), 3),
        "first_steps_extra_cpu_s": round(max(0.0, sum(cpus[:first]) - first * cpu) / threads, 3),
        "threads": threads,
        "tokens_per_s_free_cores": round(tps * threads / max(cpu, 1e-9), 1),
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
            f"  measured      {m['tokens_per_s']:,.1f} tokens/s: the median of {m['steps'] + 1 - m['warmup_steps']} "
            f"training steps of this model and method on this machine ({m['threads']} threads; steps "
            f"{', '.join(f'{x:.2f}' for x in m['step_wall_s'])} s wall; the first {m['warmup_steps']} took "
            f"{m['first_steps_extra_s']:.2f} s more, which the run pays once)",
            f"  estimate      {_duration(r['estimated_s'])} of training at that pace; "
            f"{_duration(r['estimated_free_cores_s'])} if the {m['threads']} threads had their cores to "
            "themselves (from the CPU time; model/data loading, saves and evaluation not included)",
        ]
    return "\n".join(lines)
