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
    """The run's plan (train.plan.Plan.describe), parameter counts and, if measure_steps > 0, its measured pace
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


# ---------------------------------------------------------------------------------------------------------
# peak memory, before anything is allocated

GIB = 2**30
FIXED_BYTES = GIB // 2  # interpreter, torch, tokenizer, data, allocator slack
HEAD_LOSS_BYTES = 128 * 2**20  # the chunked head loss's logits chunks (headloss.py)


def _meta_model(spec: str):
    """The model's architecture on the meta device: shapes and parameter counts, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorascope.models import base_of, resolve_base

    config = AutoConfig.from_pretrained(resolve_base(base_of(spec)))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), config.get_text_config()


def _trainable(model, cfg: RunConfig) -> int:
    """Parameters the optimizer holds: all of them (full FT), or the adapters' (and trained embeddings')."""
    if cfg.method.kind == "full":
        return sum(p.numel() for p in model.parameters())
    m, n = cfg.method, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in m.target_modules:
            n += m.rank * (mod.in_features + mod.out_features)
    emb = model.get_input_embeddings().weight.numel()
    return n + emb * (int(m.train_embed_tokens) + int(m.train_lm_head))


def memory_estimate(cfg: RunConfig) -> dict:
    """Peak bytes of one training process, from the model's shapes: fp32 weights; gradients and optimizer
    state (AdamW 2, Lion 1 value) of the trained parameters; activations kept for the backward pass, per token
    and layer ~ 8 hidden + 5 MLP-intermediate values + one attention row (heads x seq_len), over one micro-batch
    (train.batch_size rows); plus a fixed overhead. Against measured peak RSS on the embedded model (seq 256 x
    batch 4, 2 CPU cores): full FT 4.3 GiB estimated / 3.9 measured, LoRA r=16 2.9 / 2.7: an upper bound by ~10%."""
    model, c = _meta_model(cfg.model)
    t = cfg.train
    total = sum(p.numel() for p in model.parameters())
    trained = _trainable(model, cfg)
    states = 2 if t.optimizer == "adamw" else 1
    per_token_layer = 8 * c.hidden_size + 5 * getattr(c, "intermediate_size", 4 * c.hidden_size)
    per_token_layer += getattr(c, "num_attention_heads", 1) * t.seq_len
    act_bytes = 2 if t.precision == "bf16" else 4
    parts = {
        "weights": 4 * total,
        "gradients_and_optimizer": 4 * trained * (1 + states) + (4 * trained if cfg.method.kind != "full" else 0),
        "activations": act_bytes * per_token_layer * c.num_hidden_layers * t.seq_len * t.batch_size,
        "fixed": FIXED_BYTES + HEAD_LOSS_BYTES,
    }
    return {"peak_bytes": sum(parts.values()), "parts": parts, **available_memory()}


def available_memory() -> dict:
    """{"available_bytes", "available_where"}: free GPU memory where training runs on a GPU, else the smaller of
    the machine's MemAvailable and what this process's cgroup (container) limit leaves."""
    if torch.cuda.is_available():
        return {"available_bytes": torch.cuda.mem_get_info()[0], "available_where": "free on GPU 0"}
    found = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found["MemAvailable"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    cg = Path("/sys/fs/cgroup")
    try:
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            found["cgroup limit"] = int(limit) - int((cg / "memory.current").read_text())
    except (OSError, ValueError):
        pass
    if not found:
        return {"available_bytes": None, "available_where": "unknown"}
    where = min(found, key=found.get)
    return {"available_bytes": found[where], "available_where": where}


def format_memory(m: dict) -> str:
    p = {k: v / GIB for k, v in m["parts"].items()}
    avail = m["available_bytes"]
    have = f"{avail / GIB:.1f} GiB available ({m['available_where']})" if avail is not None else "available unknown"
    return (
        f"  memory        ~{m['peak_bytes'] / GIB:.1f} GiB peak estimated (weights {p['weights']:.1f}, gradients and "
        f"optimizer {p['gradients_and_optimizer']:.1f}, activations {p['activations']:.1f}, fixed {p['fixed']:.1f}); "
        f"{have}"
    )


def check_memory(m: dict) -> None:
    """LorascopeError when the estimate exceeds what is available (a process of a multi-process launch is
    not checked: its share of the batch and of sharded state is not what the estimate assumes)."""
    import os

    from lorascope.errors import LorascopeError

    avail = m["available_bytes"]
    if avail is None or int(os.environ.get("WORLD_SIZE", "1")) > 1 or m["peak_bytes"] <= avail:
        return
    raise LorascopeError(
        f"train: estimated peak memory {m['peak_bytes'] / GIB:.1f} GiB exceeds the {avail / GIB:.1f} GiB available "
        f"({m['available_where']}); lower train.batch_size (raise train.grad_accum for the same tokens per step) "
        "or train.seq_len, or pass --ignore-memory-estimate"
    )
