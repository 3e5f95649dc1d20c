"""Step arithmetic of a run: the budget in optimizer steps, where checkpoints fall, and which rows each step reads.

    plan = Plan(cfg.train, n_rows=len(dataset))
    plan.total                 # ceil(max_tokens / tokens_per_step), or epochs * steps_per_epoch
    plan.checkpoints           # {step: ("tokens", 4096), ...} or {step: ("epoch", 1), ...}; always the last step
    plan.rows(step)            # global row indices of that optimizer step

The data order is a function of (seed, step) alone: each epoch is a seeded permutation of the rows, so every
method, process count and resumed run reads the same rows at the same step. Rows left over at the end of an
epoch (fewer than one step's worth) are not trained on in that epoch.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .errors import ConfigError, LorascopeError


def checkpoint_name(kind: str, value: int) -> str:
    """('tokens', 4096) -> 'tok-000000004096'; ('epoch', 2) -> 'epoch-002'."""
    return f"tok-{value:012d}" if kind == "tokens" else f"epoch-{value:03d}"


class Plan:
    """Budget and data order of one run (see module docstring)."""

    def __init__(self, t: TrainConfig, n_rows: int):
        self.rows_per_step = t.batch_size * t.grad_accum
        self.n_rows = n_rows
        self.seed = t.seed
        if n_rows < self.rows_per_step:
            raise LorascopeError(f"data.dataset: only {n_rows} sequences of train.seq_len={t.seq_len} tokens, "
                                 f"fewer than one step's {self.rows_per_step} (train.batch_size x train.grad_accum)")
        self.steps_per_epoch = n_rows // self.rows_per_step
        self.by_epoch = t.epochs is not None
        if self.by_epoch:
            self.total = t.epochs * self.steps_per_epoch
            self.checkpoints = {e * self.steps_per_epoch: ("epoch", e) for e in t.checkpoints if e < t.epochs}
            self.checkpoints[self.total] = ("epoch", t.epochs)
        else:
            self.total = math.ceil(t.max_tokens / t.tokens_per_step)
            self.checkpoints = {math.ceil(b / t.tokens_per_step): ("tokens", b) for b in t.checkpoints
                                if b < t.max_tokens}
            self.checkpoints[self.total] = ("tokens", t.max_tokens)
        self.branches = t.cooldown_per_checkpoint
        if self.branches and (self.by_epoch or t.schedule != "wsd"):
            raise ConfigError("train.cooldown_per_checkpoint: needs schedule=wsd and a token budget "
                              "(train.max_tokens, no train.epochs)")
        self._perm: tuple[int, torch.Tensor] | None = None

    def name(self, step: int) -> str:
        return checkpoint_name(*self.checkpoints[step])

    def rows(self, step: int) -> list[int]:
        """Global row indices of optimizer step `step` (independent of method and process count)."""
        per_epoch = self.steps_per_epoch * self.rows_per_step
        out = []
        for k in range(step * self.rows_per_step, (step + 1) * self.rows_per_step):
            epoch, i = divmod(k, per_epoch)
            if self._perm is None or self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = (epoch, torch.randperm(self.n_rows, generator=g))
            out.append(int(self._perm[1][i]))
        return out
