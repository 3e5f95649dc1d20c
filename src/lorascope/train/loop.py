"""ONE training loop for every method (full FT and all LoRA variants), on HF accelerate.

    cfg = load_run_config("configs/train-quick.yaml", ["method.kind=full", "train.lr=2e-5"])
    train(cfg, Path("runs/full"))     # resumes by itself if runs/full holds an unfinished run

The recipe is a `Trainer` whose named steps run in this order: setup (accelerator, model + method, data, plan,
optimizer) -> write_record -> resume -> run (run_step per optimizer step; save_checkpoint, save_state and
cooldown_branch where the plan says) -> finish (summary.json, COMPLETE). Every method goes through the same steps.

Fair comparison by construction: the data order is a function of (seed, step) only (train.plan.Plan), the
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

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lorascope.config import RunConfig, TrainConfig, dump
from lorascope.errors import LorascopeError, TrainingDiverged
from lorascope.fileio import atomic_write_text
from lorascope.train import runlog, tracking
from lorascope.train.headloss import HeadLoss, n_targets
from lorascope.train.plan import Plan
from lorascope.train.schedules import branch_multiplier, cooldown_start, multiplier
from lorascope.train.sharded import die_with_launcher, enable_cpu_fsdp, fsdp_plugin


def _optimizer(groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Lion over methods.param_groups; each group keeps its own base lr ("initial_lr")."""
    for g in groups:
        g["initial_lr"] = g["lr"]
    if t.optimizer == "lion":
        from lion_pytorch import Lion  # decoupled weight decay (p *= 1 - lr*wd), like the paper's LionW

        return Lion(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    # fused: one pass over each parameter instead of ~10 elementwise kernels (torch >= 2.4, CPU and CUDA); it is
    # also HF Trainer's default AdamW. For full FT the optimizer step is ~10% of a step on CPU otherwise.
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=True)


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
    die_with_launcher()  # sharded: a rank never outlives its launcher
    # accelerate selects gloo (MULTI_CPU) for a multi-process launch only when told cpu=True.
    cpu = world_env > 1 and not torch.cuda.is_available()
    plugin = fsdp_plugin(t.precision)  # None unless an FSDP launch config asked for sharding
    acc = Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if t.precision == "bf16" else "no",
        gradient_accumulation_steps=t.grad_accum,
        fsdp_plugin=None if cpu else plugin,
    )
    enable_cpu_fsdp(acc, plugin)  # sharded: FSDP2 on CPU/gloo when an FSDP launch config asked for it
    if acc.num_processes != world_env:
        raise LorascopeError(
            f"launched as {world_env} processes but accelerate set up {acc.num_processes}; "
            "see configs/accelerate/ for working launch configs"
        )
    if t.batch_size % acc.num_processes:
        raise LorascopeError(
            f"train.batch_size: {t.batch_size} is not divisible by {acc.num_processes} processes "
            "(it is the global micro-batch)"
        )
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
    out = Path(out)
    resolved = dump(cfg)
    _check_run_dir(out, resolved)
    if (out / "COMPLETE").exists():
        return out
    runlog.reset_peak_memory()  # this run's peak, not an earlier job's in the same worker process
    # Everything that can fail on user input (setup) happens before the run record is written.
    trainer = Trainer.setup(cfg, out)
    trainer.write_record(resolved)
    trainer.resume()
    trainer.tracker = tracking.start(cfg.tracking, out, resolved, trainer.main)
    try:
        trainer.run(progress)
        trainer.finish()
    finally:
        trainer.tracker.finish()
    return out


class Trainer:
    """The state of one run between its named steps: setup -> write_record -> resume -> run -> finish.

    ``run`` calls ``run_step`` once per optimizer step, ``save_checkpoint`` at each budget, ``save_state`` every
    ``save_state_every`` steps and ``cooldown_branch`` where an intermediate budget's cooldown begins. Each step
    is a method, so a test (or the dry run) can drive them one by one.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        acc,
        model,
        tok,
        data,
        manifest: dict,
        plan: Plan,
        opt,
        counts: tuple[int, int],
        head_loss: HeadLoss | None = None,
    ):
        self.cfg, self.t, self.out, self.acc = cfg, cfg.train, out, acc
        self.head_loss = head_loss  # None: transformers' own loss (headloss.py says where each is used)
        self.model, self.tok, self.data, self.manifest, self.plan, self.opt = model, tok, data, manifest, plan, opt
        self.n_trainable, self.n_total = counts
        self.world, self.main = acc.num_processes, acc.is_main_process
        self.sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.state_dir = out / "state"
        self.lr_mult = multiplier(
            self.t.schedule,
            plan.total,
            int(round(self.t.warmup_frac * plan.total)),
            self.t.cooldown_frac,
            self.t.min_lr_ratio,
        )
        self.prog = {"step": 0, "checkpoints": [], "elapsed_s": 0.0, "tokens_processed": 0, "sessions": 0}
        self.step, self.done = 0, set()
        self.tracker = tracking.RunTracker()  # off until train() starts it; it only reads what the loop logs
        self.t_start, self.elapsed0, self.processed0, self.processed = time.time(), 0.0, 0, 0

    @classmethod
    def setup(cls, cfg: RunConfig, out: Path) -> Trainer:
        """Accelerator, seeded model + method, data, plan and optimizer; writes nothing but OUT/init (PiSSA/OLoRA)."""
        from accelerate.utils import set_seed

        from lorascope.data import dataset_manifest, load_dataset
        from lorascope.models import load_base
        from lorascope.train import methods

        t = cfg.train
        acc = _accelerator(t)
        set_seed(t.seed)  # same seed -> same LoRA init and dropout masks, whatever the method
        model, tok = load_base(cfg.model)
        data = load_dataset(cfg.data, tok, t.seq_len, "train")
        manifest = dataset_manifest(cfg.data, tok)
        plan = Plan(t, len(data))
        model = methods.apply_method(model, cfg.method, work_dir=out / "init")
        head_loss = HeadLoss.install(model, data[0], t.precision)
        opt = _optimizer(methods.param_groups(model, cfg.method, t.lr, t.weight_decay), t)
        counts = methods.trainable_parameters(model), methods.total_parameters(model)
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED") and cfg.method.init == "loftq":
            raise LorascopeError(
                "method.init: loftq merges its adapter in place at save time, which sharded "
                "(FSDP/ZeRO) weights do not allow; train LoftQ on one process"
            )
        model, opt = acc.prepare(model, opt)
        return cls(cfg, out, acc, model, tok, data, manifest, plan, opt, counts, head_loss)

    def write_record(self, resolved: dict) -> None:
        """The run directory: config, data manifest, and a state.tmp a kill left complete promoted to state."""
        if self.main:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            runlog.write_config(self.out / "config.yaml", resolved)
            runlog.write_json(self.out / "data_manifest.json", self.manifest)
            runlog.promote_state(self.out)
        self.acc.wait_for_everyone()

    def resume(self) -> None:
        """Load RUN/state if there is one (model, optimizer, RNG, progress); start this session's record."""
        progress_file = self.state_dir / "progress.json"
        if progress_file.exists():
            try:
                self.prog.update(json.loads(progress_file.read_text()))
                self.acc.load_state(str(self.state_dir))
            except Exception as e:  # noqa: BLE001 - name the damaged file, whatever the loader raised
                bad = runlog.first_unreadable(self.state_dir)
                where, why = bad if bad else (self.state_dir, str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise LorascopeError(
                    f"{where}: unreadable training state ({why}); delete {self.state_dir} to restart from the beginning"
                ) from None
        self.step, self.done = self.prog["step"], set(self.prog["checkpoints"])
        self.prog["sessions"] += 1
        if self.main:
            runlog.truncate_loss(self.out / "loss.jsonl", self.step)  # drop lines logged after the resumed state
            runlog.write_meta(
                self.out / "meta.json",
                seed=self.t.seed,
                processes=self.world,
                start_step=self.step,
                data_manifest_hash=self.manifest["content_hash"],
            )
        self.t_start, self.elapsed0 = time.time(), self.prog["elapsed_s"]
        self.processed0 = self.processed = self.prog["tokens_processed"]

    def elapsed(self) -> float:
        """Training wall time over all sessions of this run."""
        return self.elapsed0 + time.time() - self.t_start

    def save_state(self, at: int) -> None:
        """Resumable state as of optimizer step `at`, written to state.tmp and renamed over RUN/state.

        Not fileio.atomic_dir: every rank writes its files into state.tmp, so the swap is the main process's
        between barriers; a kill inside the swap leaves a complete state.tmp that runlog.promote_state uses."""
        acc, tmp = self.acc, self.out / "state.tmp"
        acc.wait_for_everyone()
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process's files (its RNG state, its shard) are in tmp before the rename
        if self.main:  # progress.json last: a state dir without it is incomplete
            runlog.write_json(
                tmp / "progress.json",
                {
                    **self.prog,
                    "step": at,
                    "checkpoints": sorted(self.done),
                    "elapsed_s": self.elapsed(),
                    "tokens_processed": self.processed,
                },
            )
            shutil.rmtree(self.state_dir, ignore_errors=True)
            tmp.rename(self.state_dir)
        acc.wait_for_everyone()

    def run_step(self, s: int, mult: float) -> dict:
        """Optimizer step `s` at lr multiplier `mult`: {"loss", "lr", "grad_norm"} (loss over all processes)."""
        acc, t, data = self.acc, self.t, self.data
        lr = _set_lr(self.opt, mult)
        rows, per, rank = self.plan.rows(s), t.batch_size // self.world, acc.process_index
        # Token-weighted mean over the whole optimizer step (all micro-batches, all processes): each micro
        # loss is sum/n_items; x(world*grad_accum) undoes accelerate's /grad_accum and DDP's mean over ranks.
        n_items = n_targets(torch.stack([data[i]["labels"] for i in rows]))
        local = torch.zeros((), device=acc.device)
        gn = None
        self.model.train()
        for m in range(t.grad_accum):
            mine = rows[m * t.batch_size + rank * per : m * t.batch_size + (rank + 1) * per]
            inputs = {k: torch.stack([data[i][k] for i in mine]).to(acc.device) for k in data[mine[0]]}
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss = self.loss(inputs, n_items)
                acc.backward(loss * (self.world * t.grad_accum))
                if acc.sync_gradients:
                    gn = acc.clip_grad_norm_(self.trained, t.grad_clip or float("inf"))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            local += loss.detach().float()
        self.processed += t.tokens_per_step
        loss_v = acc.reduce(local, reduction="sum").item()
        return {"loss": loss_v, "lr": lr, "grad_norm": float(gn) if gn is not None else None}

    def loss(self, inputs: dict, n_items: int) -> torch.Tensor:
        """Sum of the micro-batch's token losses / n_items (the whole optimizer step's predicted tokens)."""
        if self.head_loss is not None:
            return self.head_loss.loss(self.model, inputs, n_items)
        return self.model(**inputs, num_items_in_batch=n_items).loss

    def save_checkpoint(self, s: int, mult: float, cooldown: dict | None = None) -> None:
        """Checkpoint of the budget ending at step `s` (its last lr multiplier `mult`), with lorascope.json."""
        from lorascope.train import methods  # looked up at call time: tests watch what is saved

        acc, t, cfg = self.acc, self.t, self.cfg
        kind, value = self.plan.checkpoints[s]
        acc.wait_for_everyone()
        # sharded weights (FSDP / ZeRO-3) are gathered by every rank together; DDP weights are whole on rank 0
        full_sd = {"state_dict": acc.get_state_dict(self.model)} if self.sharded else {}
        if self.main:
            meta = {
                "step": s,
                "tokens": s * t.tokens_per_step,
                "epoch": value if kind == "epoch" else None,
                "budget": {kind: value},
                "method": dump(cfg.method),
                "lr": t.lr,
                "final_lr": t.lr * mult,
                "schedule": t.schedule,
                "seed": t.seed,
            }
            if cooldown:
                meta["cooldown"] = cooldown
            methods.save_checkpoint(
                acc.unwrap_model(self.model),
                cfg.method,
                self.out / "checkpoints" / self.plan.name(s),
                cfg.model,
                meta,
                tokenizer=self.tok if cfg.method.kind == "full" else None,
                **full_sd,
            )
        self.done.add(self.plan.name(s))
        acc.wait_for_everyone()

    def cooldown_branch(self, b_step: int) -> None:
        """Cooldown branch for the intermediate budget ending at optimizer step b_step (see module docstring)."""
        t = self.t
        start = cooldown_start(b_step, t.cooldown_frac)
        f = branch_multiplier(self.lr_mult, b_step, t.cooldown_frac, t.min_lr_ratio)
        self.save_state(start)  # the snapshot the main run comes back to
        trace = {"from_step": start, "lr": [], "loss": []}
        for s in range(start, b_step):
            rec = self.run_step(s, f(s))
            trace["lr"].append(rec["lr"])
            trace["loss"].append(rec["loss"])
        self.save_checkpoint(b_step, f(b_step - 1), trace)
        self.acc.load_state(str(self.state_dir))
        if self.main:  # record that this branch is done, so a resume from the snapshot skips it
            p = json.loads((self.state_dir / "progress.json").read_text())
            runlog.write_json(self.state_dir / "progress.json", {**p, "checkpoints": sorted(self.done)})
        self.acc.wait_for_everyone()

    def branches_at(self) -> dict[int, list[int]]:
        """{main-run step where a cooldown starts: [budget steps branching there]} (empty without branches)."""
        out: dict[int, list[int]] = {}
        if self.plan.branches:
            for s_b in self.plan.checkpoints:
                if s_b < self.plan.total:
                    out.setdefault(cooldown_start(s_b, self.t.cooldown_frac), []).append(s_b)
        return out

    def run(self, progress: bool = True) -> None:
        """The main loop, from the resumed step to the end of the budget."""
        plan, tps, branch_at = self.plan, self.t.tokens_per_step, self.branches_at()
        label = f"train {self.cfg.method.label()}"
        bar = tqdm(
            total=plan.total * tps,
            initial=self.step * tps,
            disable=not (progress and self.main),
            unit="tok",
            unit_scale=True,
            desc=label,
            dynamic_ncols=True,
        )
        loss_file = open(self.out / "loss.jsonl", "a") if self.main else None
        try:
            while self.step < plan.total:
                for s_b in branch_at.get(self.step, []):
                    if plan.name(s_b) not in self.done:
                        bar.set_description(f"cooldown {plan.name(s_b)}")
                        self.cooldown_branch(s_b)
                        bar.set_description(label)
                rec = self.run_step(self.step, self.lr_mult(self.step))
                self.step += 1
                self.log(rec, loss_file)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
                bar.update(tps)
                self.after_step()
        finally:
            bar.close()
            if loss_file:
                loss_file.close()

    def log(self, rec: dict, loss_file) -> None:
        """Refuse a diverged loss; append the step's line to loss.jsonl (main process, every log_every steps)."""
        step, tps = self.step, self.t.tokens_per_step
        if not math.isfinite(rec["loss"]):
            raise TrainingDiverged(f"training diverged at step {step} (loss {rec['loss']}); lower train.lr")
        if loss_file and (step % self.t.log_every == 0 or step == self.plan.total):
            session = time.time() - self.t_start
            line = {
                "step": step,
                "tokens": step * tps,
                **rec,
                "tokens_per_s": round((self.processed - self.processed0) / max(session, 1e-9), 2),
                "elapsed_s": round(self.elapsed(), 3),
            }
            loss_file.write(json.dumps(line) + "\n")
            loss_file.flush()
            self.tracker.log_step(line)

    def after_step(self) -> None:
        """Checkpoint (main-run budgets; branches save their own) and resumable state after a main-run step."""
        step, plan = self.step, self.plan
        if step in plan.checkpoints and (not plan.branches or step == plan.total):
            self.save_checkpoint(step, self.lr_mult(step - 1))
        # no state after the last step: it would only serve a crash before COMPLETE, which the last saved
        # state also covers (by recomputing), and a full-FT state weighs 3x the model
        if step < plan.total and (step in plan.checkpoints or step % self.t.save_state_every == 0):
            self.save_state(step)

    def finish(self) -> None:
        """summary.json, then COMPLETE; the resumable state is removed (a full-FT state is 3x the model)."""
        from lorascope.train.methods import checkpoint_size_bytes

        if self.main:
            out, t, plan = self.out, self.t, self.plan
            curve = runlog.read_loss(out / "loss.jsonl")
            wall = self.elapsed()
            runlog.write_json(
                out / "summary.json",
                {
                    "method": self.cfg.method.label(),
                    "tokens": plan.total * t.tokens_per_step,
                    "steps": plan.total,
                    "tokens_processed": self.processed,
                    "wall_s": round(wall, 3),
                    "tokens_per_s": round(self.processed / wall, 2),
                    "peak_memory_bytes": runlog.peak_memory_bytes(),
                    "trainable_parameters": self.n_trainable,
                    "total_parameters": self.n_total,
                    "checkpoint_size_bytes": checkpoint_size_bytes(out / "checkpoints" / plan.name(plan.total)),
                    "first_loss": curve[0]["loss"] if curve else None,
                    "final_loss": curve[-1]["loss"] if curve else None,
                    "processes": self.world,
                    "precision": t.precision,
                    "sessions": self.prog["sessions"],
                },
            )
            atomic_write_text(out / "COMPLETE", "ok\n")
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self.acc.wait_for_everyone()
