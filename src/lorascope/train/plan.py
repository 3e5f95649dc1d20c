"""Step arithmetic of a run: the budget in optimizer steps, where checkpoints fall, and which rows each step reads.

    plan = Plan(cfg.train, n_rows=len(dataset))
    plan.total                 # ceil(max_tokens / tokens_per_step), or epochs * steps_per_epoch
    plan.checkpoints           # {step: ("tokens", 4096), ...} or {step: ("epoch", 1), ...}; always the last step
    plan.rows(step)            # global row indices of that optimizer step
    budget_checkpoints(cfg.train)   # [("tokens", 4096), ("tokens", 8192)]: known before any data is read
    checkpoint_names(cfg.train)     # ['tok-000000004096', 'tok-000000008192'] (what the study schedules on)

The budget rule, in one place: with ``train.epochs`` set the budget is in epochs (whatever the data regime),
otherwise in tokens (``train.max_tokens``).

The data order is a function of (seed, step) alone: each epoch is a seeded permutation of the rows, so every
method, process count and resumed run reads the same rows at the same step. Rows left over at the end of an
epoch (fewer than one step's worth) are not trained on in that epoch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lorascope.config import TrainConfig
from lorascope.errors import ConfigError, LorascopeError
from lorascope.layout import checkpoint_name
from lorascope.train.schedules import cooldown_start

if TYPE_CHECKING:
    import torch


def budget_checkpoints(t: TrainConfig) -> list[tuple[str, int]]:
    """The run's checkpoint budgets in order, the last one always the end: ("epoch", e) when train.epochs is
    set, else ("tokens", b). Budgets at or past the end are dropped (the end is saved anyway)."""
    if t.epochs is not None:
        return [("epoch", e) for e in t.checkpoints if e < t.epochs] + [("epoch", t.epochs)]
    return [("tokens", b) for b in t.checkpoints if b < t.max_tokens] + [("tokens", t.max_tokens)]


def checkpoint_names(t: TrainConfig) -> list[str]:
    """Directory names (RUN/checkpoints/<name>) of the checkpoints a run with this config will write."""
    return [checkpoint_name(kind, value) for kind, value in budget_checkpoints(t)]


class Plan:
    """Budget and data order of one run (see module docstring)."""

    def __init__(self, t: TrainConfig, n_rows: int):
        self.rows_per_step = t.batch_size * t.grad_accum
        self.n_rows = n_rows
        self.seed = t.seed
        if n_rows < self.rows_per_step:
            raise LorascopeError(
                f"data.dataset: only {n_rows} sequences of train.seq_len={t.seq_len} tokens, "
                f"fewer than one step's {self.rows_per_step} (train.batch_size x train.grad_accum)"
            )
        self.steps_per_epoch = n_rows // self.rows_per_step
        self.by_epoch = t.epochs is not None
        self.tokens_per_step = t.tokens_per_step

        def step_of(kind: str, value: int) -> int:
            return value * self.steps_per_epoch if kind == "epoch" else math.ceil(value / t.tokens_per_step)

        self.checkpoints = {step_of(*b): b for b in budget_checkpoints(t)}
        self.total = max(self.checkpoints)
        self.branches, self.cooldown_frac = t.cooldown_per_checkpoint, t.cooldown_frac
        if self.branches and (self.by_epoch or t.schedule != "wsd"):
            raise ConfigError(
                "train.cooldown_per_checkpoint: needs schedule=wsd and a token budget "
                "(train.max_tokens, no train.epochs)"
            )
        self._perm: tuple[int, torch.Tensor] | None = None

    def name(self, step: int) -> str:
        return checkpoint_name(*self.checkpoints[step])

    def describe(self) -> dict:
        """The plan in numbers (what ``lorascope train --dry-run`` prints); tokens_processed adds the tokens
        that cooldown branches re-train."""
        tps = self.tokens_per_step
        branch_steps = (
            sum(s - cooldown_start(s, self.cooldown_frac) for s in self.checkpoints if s < self.total)
            if self.branches
            else 0
        )
        return {
            "steps": self.total,
            "tokens_per_step": tps,
            "tokens": self.total * tps,
            "tokens_processed": (self.total + branch_steps) * tps,
            "rows": self.n_rows,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": round(self.total / self.steps_per_epoch, 3),
            "checkpoints": [{"name": self.name(s), "step": s, "tokens": s * tps} for s in sorted(self.checkpoints)],
        }

    def rows(self, step: int) -> list[int]:
        """Global row indices of optimizer step `step` (independent of method and process count)."""
        per_epoch = self.steps_per_epoch * self.rows_per_step
        import torch  # here, so that planning names (studies, the report side) does not need torch

        out = []
        for k in range(step * self.rows_per_step, (step + 1) * self.rows_per_step):
            epoch, i = divmod(k, per_epoch)
            if self._perm is None or self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = (epoch, torch.randperm(self.n_rows, generator=g))
            out.append(int(self._perm[1][i]))
        return out
