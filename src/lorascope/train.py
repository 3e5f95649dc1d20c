"""ONE training loop for every method (full FT and all LoRA variants), on HF accelerate.

    cfg = load_run_config("configs/train-quick.yaml", ["method.kind=full", "train.lr=2e-5"])
    train(cfg, Path("runs/full"))     # resumes by itself if runs/full holds an unfinished run

Fair comparison by construction: the data order is a function of (seed, step) only (trainplan.Plan), the
schedule and token budget come from TrainConfig, so swapping the method changes nothing else.
``batch_size`` is the GLOBAL micro-batch, split across processes under ``accelerate launch``; the loss is the
mean over every predicted token of the optimizer step (``num_items_in_batch``, as HF Trainer does), so 1 and N
processes, and any ``grad_accum``, optimise the same objective on the same rows.

Budget: CPT counts tokens (``max_tokens``: ceil(max_tokens / tokens_per_step) optimizer steps); with ``epochs``
set the budget is epochs x steps-per-epoch (IFT). Checkpoints fall at each ``train.checkpoints`` budget
(tokens, or epochs) and at the end, in RUN/checkpoints/tok-{tokens:012d} or epoch-{e:03d}.

Per-budget cooldowns (``cooldown_per_checkpoint``, CPT + wsd), as in the paper: the main run stays at the stable
LR; when it reaches 80% of an intermediate budget B (the last ``cooldown_frac``), its resumable state is saved,
a branch decays the LR to ``min_lr_ratio`` over the same data up to B and is saved as checkpoint B (its LR and
loss trace go into the checkpoint's lorascope.json under "cooldown"), then the saved state (model, optimizer,
RNG; the data position and schedule are functions of the step) is loaded back and the main run continues as
if the branch never happened. The final budget uses the main run's own cooldown. Each branch costs
cooldown_frac x B extra tokens of compute.

Resume: state is saved atomically (temp dir + rename) every ``save_state_every`` steps, at each checkpoint and
before each branch; the same command on a killed run continues from it and reproduces the uninterrupted loss
curve. A finished run (COMPLETE) with the same config returns at once; a different config is refused.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import runlog
from .config import RunConfig, TrainConfig, dump
from .errors import LorascopeError
from .schedules import branch_multiplier, cooldown_start, multiplier
from .trainplan import Plan


def _optimizer(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Lion over methods.param_groups; each group keeps its own base lr ("initial_lr")."""
    for g in groups:
        g["initial_lr"] = g["lr"]
    if t.optimizer == "lion":
        from lion_pytorch import Lion  # decoupled weight decay (p *= 1 - lr*wd), like the paper's LionW

        return Lion(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, mult: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * mult
    return opt.param_groups[0]["lr"]


def _accelerator(t: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several runs in one process (a study, the tests) may differ in precision/accumulation; accelerate keeps
    # these in process-wide singletons that refuse a second, different setup, so start them afresh (the
    # distributed setup itself, PartialState, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate selects gloo (MULTI_CPU) for a multi-process launch only when told cpu=True.
    cpu = world_env > 1 and not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision="bf16" if t.precision == "bf16" else "no",
                      gradient_accumulation_steps=t.grad_accum)
    if acc.num_processes != world_env:
        raise LorascopeError(f"launched as {world_env} processes but accelerate set up {acc.num_processes}; "
                             "see configs/accelerate/ for working launch configs")
    if t.batch_size % acc.num_processes:
        raise LorascopeError(f"train.batch_size: {t.batch_size} is not divisible by {acc.num_processes} processes "
                             "(it is the global micro-batch)")
    return acc


def _check_run_dir(out: Path, resolved: dict) -> None:
    try:
        old = runlog.read_config(out / "config.yaml")
    except Exception as e:  # noqa: BLE001 - a damaged record must be named, whatever the parser says
        raise LorascopeError(f"{out / 'config.yaml'}: unreadable run config ({str(e).splitlines()[0]})") from None
    if old is not None and old != resolved:
        diff = runlog.first_difference(old, resolved)
        raise LorascopeError(f"{out}: holds a run with a different config ({diff}); use another --out")


def train(cfg: RunConfig, out: Path, *, progress: bool = True) -> Path:
    """Train `cfg` into run directory `out` (created, resumed, or returned as is when COMPLETE); returns `out`."""
    from accelerate.utils import set_seed

    from .data import dataset_manifest, load_dataset
    from .methods import apply_method, checkpoint_size_bytes, param_groups, save_checkpoint, total_parameters, \
        trainable_parameters
    from .models import load_base

    out, t = Path(out), cfg.train
    resolved = dump(cfg)
    _check_run_dir(out, resolved)
    if (out / "COMPLETE").exists():
        return out

    acc = _accelerator(t)
    world, main = acc.num_processes, acc.is_main_process
    set_seed(t.seed)  # same seed -> same LoRA init and dropout masks, whatever the method

    # Everything that can fail on user input happens before the run record is written.
    model, tok = load_base(cfg.model)
    data = load_dataset(cfg.data, tok, t.seq_len, "train")
    manifest = dataset_manifest(cfg.data, tok)
    plan = Plan(t, len(data))
    model = apply_method(model, cfg.method, work_dir=out / "init")
    opt = _optimizer(param_groups(model, cfg.method, t.lr, t.weight_decay), t)
    n_trainable, n_total = trainable_parameters(model), total_parameters(model)
    sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    if sharded and "state_dict" not in inspect.signature(save_checkpoint).parameters:
        raise LorascopeError(f"{acc.distributed_type.name}: saving checkpoints of sharded models needs "
                             "methods.save_checkpoint(state_dict=...), which this version lacks; use DDP")
    model, opt = acc.prepare(model, opt)
    trained = [p for p in model.parameters() if p.requires_grad]

    state_dir = out / "state"
    if main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        runlog.write_config(out / "config.yaml", resolved)
        runlog.write_json(out / "data_manifest.json", manifest)
        runlog.promote_state(out)
    acc.wait_for_everyone()

    # --- resume
    prog = {"step": 0, "checkpoints": [], "elapsed_s": 0.0, "tokens_processed": 0, "sessions": 0}
    if (state_dir / "progress.json").exists():
        try:
            prog.update(json.loads((state_dir / "progress.json").read_text()))
            acc.load_state(str(state_dir))
        except Exception as e:  # noqa: BLE001 - name the damaged file, whatever the loader raised
            bad = runlog.first_unreadable(state_dir)
            where, why = bad if bad else (state_dir, str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise LorascopeError(f"{where}: unreadable training state ({why}); delete {state_dir} to restart "
                                 "from the beginning") from None
    step, done = prog["step"], set(prog["checkpoints"])
    prog["sessions"] += 1
    if main:
        runlog.truncate_loss(out / "loss.jsonl", step)  # drop lines logged after the state we resume from
        runlog.write_meta(out / "meta.json", seed=t.seed, processes=world, start_step=step,
                          data_manifest_hash=manifest["content_hash"])

    t_start, elapsed0, processed0 = time.time(), prog["elapsed_s"], prog["tokens_processed"]
    processed = processed0

    def elapsed() -> float:
        return elapsed0 + time.time() - t_start

    def save_state(at: int) -> None:
        acc.wait_for_everyone()
        tmp = out / "state.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if main:  # progress.json last: a state dir without it is incomplete
            runlog.write_json(tmp / "progress.json", {**prog, "step": at, "checkpoints": sorted(done),
                                                      "elapsed_s": elapsed(), "tokens_processed": processed})
            shutil.rmtree(state_dir, ignore_errors=True)
            tmp.rename(state_dir)
        acc.wait_for_everyone()

    def run_step(s: int, mult: float) -> dict:
        nonlocal processed
        lr = _set_lr(opt, mult)
        rows, per, rank = plan.rows(s), t.batch_size // world, acc.process_index
        # Token-weighted mean over the whole optimizer step (all micro-batches, all processes): each micro
        # loss is sum/n_items; x(world*grad_accum) undoes accelerate's /grad_accum and DDP's mean over ranks.
        n_items = max(1, sum(int((data[i]["labels"][1:] != -100).sum()) for i in rows))
        local = torch.zeros((), device=acc.device)
        gn = None
        model.train()
        for m in range(t.grad_accum):
            mine = rows[m * t.batch_size + rank * per: m * t.batch_size + (rank + 1) * per]
            inputs = {k: torch.stack([data[i][k] for i in mine]).to(acc.device) for k in data[mine[0]]}
            with acc.accumulate(model):
                with acc.autocast():
                    loss = model(**inputs, num_items_in_batch=n_items).loss
                acc.backward(loss * (world * t.grad_accum))
                if acc.sync_gradients:
                    gn = acc.clip_grad_norm_(trained, t.grad_clip or float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
            local += loss.detach().float()
        processed += t.tokens_per_step
        loss_v = acc.reduce(local, reduction="sum").item()
        return {"loss": loss_v, "lr": lr, "grad_norm": float(gn) if gn is not None else None}

    def save_ckpt(s: int, mult: float, cooldown: dict | None = None) -> None:
        kind, value = plan.checkpoints[s]
        acc.wait_for_everyone()
        # sharded weights (FSDP / ZeRO-3) are gathered by every rank together; DDP weights are whole on rank 0
        full_sd = {"state_dict": acc.get_state_dict(model)} if sharded else {}
        if main:
            meta = {"step": s, "tokens": s * t.tokens_per_step, "epoch": value if kind == "epoch" else None,
                    "budget": {kind: value}, "method": dump(cfg.method), "lr": t.lr, "final_lr": t.lr * mult,
                    "schedule": t.schedule, "seed": t.seed}
            if cooldown:
                meta["cooldown"] = cooldown
            save_checkpoint(acc.unwrap_model(model), cfg.method, out / "checkpoints" / plan.name(s), cfg.model,
                            meta, tokenizer=tok if cfg.method.kind == "full" else None, **full_sd)
        done.add(plan.name(s))
        acc.wait_for_everyone()

    lr_mult = multiplier(t.schedule, plan.total, int(round(t.warmup_frac * plan.total)), t.cooldown_frac,
                         t.min_lr_ratio)

    def branch(b_step: int) -> None:
        """Cooldown branch for the intermediate budget ending at optimizer step b_step (see module docstring)."""
        start = cooldown_start(b_step, t.cooldown_frac)
        f = branch_multiplier(lr_mult, b_step, t.cooldown_frac, t.min_lr_ratio)
        save_state(start)  # the snapshot the main run comes back to
        trace = {"from_step": start, "lr": [], "loss": []}
        for s in range(start, b_step):
            rec = run_step(s, f(s))
            trace["lr"].append(rec["lr"])
            trace["loss"].append(rec["loss"])
        save_ckpt(b_step, f(b_step - 1), trace)
        acc.load_state(str(state_dir))
        if main:  # record that this branch is done, so a resume from the snapshot skips it
            p = json.loads((state_dir / "progress.json").read_text())
            runlog.write_json(state_dir / "progress.json", {**p, "checkpoints": sorted(done)})
        acc.wait_for_everyone()

    branch_at: dict[int, list[int]] = {}
    if plan.branches:
        for s_b in plan.checkpoints:
            if s_b < plan.total:
                branch_at.setdefault(cooldown_start(s_b, t.cooldown_frac), []).append(s_b)

    # --- the loop
    tps = t.tokens_per_step
    bar = tqdm(total=plan.total * tps, initial=step * tps, disable=not (progress and main), unit="tok",
               unit_scale=True, desc=f"train {cfg.method.label()}", dynamic_ncols=True)
    loss_file = open(out / "loss.jsonl", "a") if main else None
    try:
        while step < plan.total:
            for s_b in branch_at.get(step, []):
                if plan.name(s_b) not in done:
                    bar.set_description(f"cooldown {plan.name(s_b)}")
                    branch(s_b)
                    bar.set_description(f"train {cfg.method.label()}")
            rec = run_step(step, lr_mult(step))
            step += 1
            session = time.time() - t_start
            if not math.isfinite(rec["loss"]):
                raise LorascopeError(f"training diverged at step {step} (loss {rec['loss']}); lower train.lr")
            if loss_file and (step % t.log_every == 0 or step == plan.total):
                loss_file.write(json.dumps({"step": step, "tokens": step * tps, **rec,
                                            "tokens_per_s": round((processed - processed0) / max(session, 1e-9), 2),
                                            "elapsed_s": round(elapsed(), 3)}) + "\n")
                loss_file.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
            bar.update(tps)
            if step in plan.checkpoints and (not plan.branches or step == plan.total):
                save_ckpt(step, lr_mult(step - 1))
            # no state after the last step: it would only serve a crash before COMPLETE, which the last saved
            # state also covers (by recomputing), and a full-FT state weighs 3x the model
            if step < plan.total and (step in plan.checkpoints or step % t.save_state_every == 0):
                save_state(step)
    finally:
        bar.close()
        if loss_file:
            loss_file.close()

    if main:
        curve = runlog.read_loss(out / "loss.jsonl")
        wall = elapsed()
        runlog.write_json(out / "summary.json", {
            "method": cfg.method.label(), "tokens": plan.total * tps, "steps": plan.total,
            "tokens_processed": processed, "wall_s": round(wall, 3), "tokens_per_s": round(processed / wall, 2),
            "peak_memory_bytes": runlog.peak_memory_bytes(), "trainable_parameters": n_trainable,
            "total_parameters": n_total,
            "checkpoint_size_bytes": checkpoint_size_bytes(out / "checkpoints" / plan.name(plan.total)),
            "first_loss": curve[0]["loss"] if curve else None, "final_loss": curve[-1]["loss"] if curve else None,
            "processes": world, "precision": t.precision, "sessions": prog["sessions"]})
        (out / "COMPLETE").write_text("ok\n")
        shutil.rmtree(state_dir, ignore_errors=True)  # only needed to resume; a full-FT state is 3x the model
    acc.wait_for_everyone()
    return out
