"""The contract every evaluation task follows.

A task is a small object with a ``name`` and a ``run(ctx) -> TaskResult``. Metric keys follow
lm-evaluation-harness (``"acc,none"``, ``"acc_stderr,none"``, ``"exact_match,strict-match"``, ``"pass@1"``,
``"bpb"``), so numbers can be compared with the standard harness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class EvalContext:
    """What a task needs to run: the model under test and the evaluation settings."""

    model: Any
    tokenizer: Any
    model_spec: str = ""
    batch_size: int = 8
    seed: int = 0
    limit: int | None = None
    shots: int | None = None
    samples: int | None = None
    temperature: float | None = None
    allow_code_execution: bool = False
    reference_model: Any = None
    """Model to compare against for KL-based forgetting proxies (usually the base)."""
    excluded_ids: dict[str, list] = field(default_factory=dict)
    """Per task, item ids to skip (e.g. GSM8K problems used as training templates)."""
    out_dir: Path | None = None
    progress: bool = True
    split: str | None = None
    """Score only the items of this split ("validation": a point whose test numbers no verdict reads); None: all."""


@dataclass
class TaskResult:
    metrics: dict[str, float]
    samples: list[dict]
    info: dict = field(default_factory=dict)
    """n, shots, prompt style, split, notes on what was scored."""
    metrics_of: Callable[[list[dict]], dict] | None = None
    """The task's metrics recomputed from any subset of its samples (``metrics`` is it on all of them); the
    api applies it per validation/test split."""


class Task(Protocol):
    name: str

    def run(self, ctx: EvalContext) -> TaskResult: ...


class GenerativeTask:
    """A task that generates text: a per-task default generation length, overridable per instance."""

    name = ""
    max_new_tokens = 256

    def __init__(self, max_new_tokens: int | None = None):
        if max_new_tokens is not None:
            self.max_new_tokens = max_new_tokens
