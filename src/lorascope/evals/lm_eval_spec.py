"""What an ``lm_eval:<task>[@role]`` name means, without running anything: its task config's headline metric,
direction and filter, and the role named by the suffix (lm_eval_task.py runs it). Torch-free and apart from the
runner, so the task catalog can ask it without importing what the runner imports.
"""

from __future__ import annotations

import os
from functools import lru_cache

from ..errors import LorascopeError

PREFIX = "lm_eval:"
ROLES = ("learning", "forgetting")
INCLUDE_ENV = "LORASCOPE_LM_EVAL_INCLUDE"


def parse(arg: str) -> tuple[str, str | None]:
    """``"mytask@forgetting"`` -> ("mytask", "forgetting"); a role must be one of ROLES."""
    task, sep, role = arg.partition("@")
    if not task:
        raise LorascopeError(f"task '{PREFIX}{arg}': name an lm-eval task, e.g. {PREFIX}arc_easy@forgetting")
    if sep and role not in ROLES:
        raise LorascopeError(f"task '{PREFIX}{arg}': role must be @learning or @forgetting, got '@{role}'")
    return task, (role or None)


def _include_paths() -> tuple[str, ...]:
    return tuple(p for p in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if p)


@lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LorascopeError(f"{PREFIX} tasks need lm-evaluation-harness: pip install 'lorascope[lm-eval]'") from None
    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def task_manager(task: str):
    """A TaskManager that knows ``task``: the include paths alone first (fast), then with lm-eval's own tasks."""
    include = _include_paths()
    if include and _manager(include, False).task_index.get(task) is not None:
        return _manager(include, False)
    tm = _manager(include, True)
    if tm.task_index.get(task) is None:
        where = f" or in {INCLUDE_ENV}={os.pathsep.join(include)}" if include else f" (set {INCLUDE_ENV} for own YAMLs)"
        raise LorascopeError(f"task '{PREFIX}{task}': lm-eval has no such task among its own{where}")
    return tm


@lru_cache(maxsize=64)
def headline(task: str) -> tuple[str, str, bool]:
    """(per-item metric, filter, higher is better) of an lm-eval task, from its config's metric_list."""
    cfg = task_manager(task).task_index[task].cfg or {}
    metrics = cfg.get("metric_list") or []
    mean = [m for m in metrics if m.get("aggregation", "mean") == "mean"]
    if not mean:
        raise LorascopeError(
            f"task '{PREFIX}{task}': no metric aggregated by 'mean' in its metric_list "
            f"({[m.get('metric') for m in metrics]}); a per-item mean is what lorascope resamples"
        )
    m = mean[0]
    higher = m.get("higher_is_better")
    if higher is None:
        from lm_eval.api.registry import is_higher_better

        higher = is_higher_better(m["metric"])
    filters = cfg.get("filter_list") or [{"name": "none"}]
    return str(m["metric"]), str(filters[0]["name"]), bool(higher)


def catalog_entry(name: str) -> tuple[str, bool, str, str] | None:
    """(result key, higher is better, role, per-item field) of ``lm_eval:<task>@<role>`` for evals.catalog;
    None without a role (evaluated and stored, no headline candidate)."""
    task, role = parse(name[len(PREFIX) :])
    if role is None:
        return None
    metric, filt, higher = headline(task)
    return f"{metric},{filt}", higher, role, metric
