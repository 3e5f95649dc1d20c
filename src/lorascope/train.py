"""ONE training loop for every method (full FT and all LoRA variants), on HF accelerate.

    cfg = load_run_config("configs/train-quick.yaml", ["method.kind=full", "train.lr=2e-5"])
    train(cfg, Path("runs/full"))     # resumes by itself if runs/full holds an unfinished run

Fair comparison by construction: the data order is a function of (seed, step) only — row indices come from a
seeded permutation per epoch — and the schedule and token budget come from TrainConfig, so swapping the method
changes nothing else. ``batch_size`` is the GLOBAL micro-batch (split across processes under
``accelerate launch``), so 1 and N processes see the same rows per optimizer step.

Checkpoints: at each budget in ``train.checkpoints`` (tokens for CPT, epochs for IFT) and at the end. With
``cooldown_per_checkpoint`` (CPT + wsd) each intermediate budget B gets its own cooldown, as in the paper: the
main run stays at the stable LR; when it reaches 80% of B, its state is kept, a branch decays the LR over the
same data up to B and is saved as checkpoint B, then the kept state is restored and the main run continues.
The final budget uses the main run's own cooldown. Branches cost 20% extra compute per intermediate budget.

Resume: state is saved (atomically) every ``save_state_every`` steps, at each checkpoint and before each branch;
a killed run started again with the same command continues from it and reproduces the uninterrupted loss curve
(same data order, restored RNG states).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import runlog
from .config import RunConfig, dump
from .errors import LorascopeError
from .schedules import cooldown_start, decay, multiplier


def _optimizer(groups: list[dict], t) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    if t.optimizer == "lion":
        from lion_pytorch import Lion  # decoupled weight decay, like the paper's LionW

        return Lion(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, mult: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * mult
    return opt.param_groups[0]["lr"]


class Plan:
    """Step arithmetic: budgets in optimizer steps and which rows each step reads."""

    def __init__(self, cfg: RunConfig, n_rows: int):
        t = cfg.train
        self.rows_per_step = t.batch_size * t.grad_accum
        self.n_rows = n_rows
        self.seed = t.seed
        if cfg.data.regime == "ift" and t.epochs:
            self.steps_per_epoch = max(1, n_rows // self.rows_per_step)
            self.total = t.epochs * self.steps_per_epoch
            self.ckpt_steps = {e * self.steps_per_epoch: ("epoch", e) for e in t.checkpoints if e < t.epochs}
            self.ckpt_steps[self.total] = ("epoch", t.epochs)
        else:
            if t.max_tokens is None:
                raise LorascopeError("train.max_tokens: CPT needs a token budget")
            self.steps_per_epoch = max(1, n_rows // self.rows_per_step)
            self.total = math.ceil(t.max_tokens / t.tokens_per_step)
            self.ckpt_steps = {math.ceil(b / t.tokens_per_step): ("tokens", b) for b in t.checkpoints
                               if b < t.max_tokens}
            self.ckpt_steps[self.total] = ("tokens", t.max_tokens)
        self._perm_cache: dict[int, torch.Tensor] = {}

    def rows(self, step: int) -> list[int]:
        """Global row indices of optimizer step `step` (independent of method and process count)."""
        start = step * self.rows_per_step
        out = []
        for k in range(start, start + self.rows_per_step):
            epoch, i = divmod(k, self.steps_per_epoch * self.rows_per_step)
            if epoch not in self._perm_cache:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm_cache = {epoch: torch.randperm(self.n_rows, generator=g)}
            out.append(int(self._perm_cache[epoch][i % self.n_rows]))
        return out


def _checkpoint_name(kind: str, value: int) -> str:
    return f"tok-{value:012d}" if kind == "tokens" else f"epoch-{value:03d}"


def train(cfg: RunConfig, out: Path, *, progress: bool = True) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .data import dataset_manifest, load_dataset
    from .methods import apply_method, checkpoint_size_bytes, param_groups, save_checkpoint, total_parameters, \
        trainable_parameters
    from .models import load_base

    out = Path(out)
    t = cfg.train
    resolved = dump(cfg)
    old = runlog.read_config(out / "config.yaml")
    if old is not None and old != resolved:
        raise LorascopeError(f"{out}: holds a run with a different config (use another --out)")
    if (out / "COMPLETE").exists():
        return out

    acc = Accelerator(mixed_precision="bf16" if t.precision == "bf16" else "no")
    world = acc.num_processes
    if t.batch_size % world:
        raise LorascopeError(f"train.batch_size: {t.batch_size} is not divisible by {world} processes")
    set_seed(t.seed)

    # Everything that can fail on user input happens before the run directory is written.
    model, tok = load_base(cfg.model)
    data = load_dataset(cfg.data, tok, t.seq_len, "train")
    manifest = dataset_manifest(cfg.data, tok)
    plan = Plan(cfg, len(data))
    if plan.rows_per_step > len(data):
        raise LorascopeError(f"data.dataset: only {len(data)} sequences, fewer than one step's "
                             f"{plan.rows_per_step} (train.batch_size x train.grad_accum)")

    if acc.is_main_process:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        runlog.write_config(out / "config.yaml", resolved)
        runlog.write_json(out / "data_manifest.json", manifest)
        runlog.write_json(out / "meta.json", {**runlog.environment(), "seed": t.seed, "processes": world,
                                              "data_manifest_hash": manifest["content_hash"]})
    acc.wait_for_everyone()

    model = apply_method(model, cfg.method, work_dir=out / "init")
    opt = _optimizer(param_groups(model, cfg.method, t.lr, t.weight_decay), t)
    model, opt = acc.prepare(model, opt)
    n_trainable, n_total = trainable_parameters(model), total_parameters(model)

    warmup = int(round(t.warmup_frac * plan.total))
    branches = cfg.data.regime == "cpt" and t.schedule == "wsd" and t.cooldown_per_checkpoint
    lr_mult = multiplier(t.schedule, plan.total, warmup, t.cooldown_frac, t.min_lr_ratio)

    # --- resume
    step, done_ckpts = 0, set()
    state_dir = out / "state"
    if (state_dir / "progress.json").exists():
        try:
            prog = json.loads((state_dir / "progress.json").read_text())
            acc.load_state(str(state_dir))
        except Exception as e:
            raise LorascopeError(f"{state_dir}: unreadable training state ({str(e).splitlines()[0]})") from None
        step, done_ckpts = prog["step"], set(prog["checkpoints"])
        if acc.is_main_process:
            runlog.truncate_loss(out / "loss.jsonl", step)

    def save_state():
        acc.wait_for_everyone()
        tmp = out / "state.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            runlog.write_json(tmp / "progress.json", {"step": step, "checkpoints": sorted(done_ckpts)})
            shutil.rmtree(state_dir, ignore_errors=True)
            tmp.rename(state_dir)
        acc.wait_for_everyone()

    def run_step(s: int, mult: float) -> dict:
        lr = _set_lr(opt, mult)
        rows = plan.rows(s)
        per = t.batch_size // world
        total_loss = torch.zeros((), device=acc.device)
        model.train()
        for micro in range(t.grad_accum):
            base = micro * t.batch_size + acc.process_index * per
            batch = [data[i] for i in rows[base: base + per]]
            inputs = {k: torch.stack([b[k] for b in batch]).to(acc.device) for k in batch[0]}
            sync = micro == t.grad_accum - 1
            ctx = acc.no_sync(model) if not sync and world > 1 else _nullctx()
            with ctx, acc.autocast():
                loss = model(**inputs).loss / t.grad_accum
                acc.backward(loss)
            total_loss += loss.detach()
        gn = acc.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = acc.reduce(total_loss, reduction="mean").item()
        return {"loss": loss_v, "lr": lr, "grad_norm": float(gn) if gn is not None else None}

    def save_ckpt(s: int):
        kind, value = plan.ckpt_steps[s]
        name = _checkpoint_name(kind, value)
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": s, "tokens": (s * t.tokens_per_step), "epoch": value if kind == "epoch" else None,
                    "budget": {kind: value}, "method": dump(cfg.method), "lr": t.lr, "seed": t.seed}
            save_checkpoint(acc.unwrap_model(model), cfg.method, out / "checkpoints" / name, cfg.model, meta,
                            tokenizer=tok if cfg.method.kind == "full" else None)
        done_ckpts.add(name)
        acc.wait_for_everyone()

    def branch(b_step: int):
        """Cooldown branch for an intermediate budget ending at optimizer step b_step."""
        start = cooldown_start(b_step, t.cooldown_frac)
        unwrapped = acc.unwrap_model(model)
        keep = (copy.deepcopy(unwrapped.state_dict()), copy.deepcopy(opt.state_dict()),
                torch.get_rng_state())
        for s in range(start, b_step):
            run_step(s, decay(s, b_step, t.cooldown_frac, t.min_lr_ratio))
        save_ckpt(b_step)
        unwrapped.load_state_dict(keep[0])
        opt.load_state_dict(keep[1])
        torch.set_rng_state(keep[2])

    # --- the loop
    branch_at = {}
    if branches:
        for s_b, (kind, value) in plan.ckpt_steps.items():
            if s_b < plan.total:
                branch_at.setdefault(cooldown_start(s_b, t.cooldown_frac), []).append(s_b)
        main_mult = lambda s: (s + 1) / warmup if s < warmup else decay(s, plan.total, t.cooldown_frac,
                                                                        t.min_lr_ratio)
    else:
        main_mult = lr_mult

    bar = tqdm(total=plan.total, initial=step, disable=not (progress and acc.is_main_process), unit="step",
               desc=f"train {cfg.method.label()}", dynamic_ncols=True)
    t0, tokens_t0 = time.time(), step * t.tokens_per_step
    loss_file = open(out / "loss.jsonl", "a") if acc.is_main_process else None
    try:
        while step < plan.total:
            for s_b in branch_at.get(step, []):
                if _checkpoint_name(*plan.ckpt_steps[s_b]) not in done_ckpts:
                    save_state()
                    branch(s_b)
            rec = run_step(step, main_mult(step))
            step += 1
            tokens = step * t.tokens_per_step
            elapsed = time.time() - t0
            tps = (tokens - tokens_t0) / max(elapsed, 1e-9)
            if loss_file and (step % t.log_every == 0 or step == plan.total):
                loss_file.write(json.dumps({"step": step, "tokens": tokens, **rec, "tokens_per_s": round(tps, 2),
                                            "elapsed_s": round(elapsed, 3)}) + "\n")
                loss_file.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if not math.isfinite(rec["loss"]):
                raise LorascopeError(f"training diverged at step {step} (loss {rec['loss']}); lower train.lr")
            if step in plan.ckpt_steps and not branches or step == plan.total:
                save_ckpt(step)
                save_state()
            elif step % t.save_state_every == 0:
                save_state()
    finally:
        bar.close()
        if loss_file:
            loss_file.close()

    if acc.is_main_process:
        curve = runlog.read_loss(out / "loss.jsonl")
        wall = sum(r.get("elapsed_s", 0) for r in curve[-1:])
        final = out / "checkpoints" / _checkpoint_name(*plan.ckpt_steps[plan.total])
        runlog.write_json(out / "summary.json", {
            "method": cfg.method.label(), "tokens": plan.total * t.tokens_per_step, "steps": plan.total,
            "tokens_per_s": curve[-1]["tokens_per_s"] if curve else None, "peak_memory_bytes": runlog.peak_memory_bytes(),
            "trainable_parameters": n_trainable, "total_parameters": n_total,
            "checkpoint_size_bytes": checkpoint_size_bytes(final), "wall_s_last_session": wall,
            "first_loss": curve[0]["loss"] if curve else None, "final_loss": curve[-1]["loss"] if curve else None,
            "processes": world, "precision": t.precision})
        (out / "COMPLETE").write_text("ok\n")
    acc.wait_for_everyone()
    return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
