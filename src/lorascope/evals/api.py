"""Evaluate a model on named tasks and write OUT/results.json plus OUT/samples/TASK.jsonl.

``results.json`` (written last, atomically; progress goes to ``results.partial.json`` meanwhile)::

    {"model": spec, "settings": {...}, "versions": {...}, "elapsed_s": ..., "complete": true,
     "tasks": {"hellaswag": {"metrics": {"acc,none": .., "acc_stderr,none": .., ...}, "n": 500, "shots": 0,
                             "by_split": {"validation": {"acc,none": .., "acc_stderr,none": .., ..., "n": 247},
                                          "test": {...}},
                             "info": {...}, "elapsed_s": ..}, ...},
     "derived": {"forgetting_mean": {"value": .., "stderr": .., "definition": "...", "parts": {...}}}}

Every line of ``samples/TASK.jsonl`` carries ``cluster`` and ``split`` (see results.py): selections read the
validation split, reported numbers the test split; ``metrics`` covers all items.

Example::

    >>> from lorascope.evals.api import evaluate
    >>> res = evaluate("embedded", ["hellaswag", "english_bpb"], Path("out/base"), limit=100)
    >>> res["tasks"]["hellaswag"]["metrics"]["acc_norm,none"]

A LoRA checkpoint of a run is evaluated with its adapters merged into the (float32) base weights: the same
function up to float32 rounding (tested for every method variant), and a plain forward pass without PEFT's
rank-r side products (bench/RESULTS.md: merged against unmerged).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import LorascopeError
from ..layout import samples_filename
from . import registry, sandbox
from .base import EvalContext
from .catalog import info, uses_reference
from .results import forgetting_mean, label_splits, metrics_by_split, write_json, write_samples


def _versions() -> dict:
    import peft
    import transformers

    from .. import __version__ as lv

    return {
        "lorascope": lv,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _excluded_ids(spec: str) -> dict[str, list]:
    """A run dir's data manifest lists eval items its training data was built from; they are skipped."""
    from ..models import is_run_dir, split_spec

    path, _ = split_spec(spec)
    if not is_run_dir(path):
        return {}
    mf = Path(path) / "data_manifest.json"
    if not mf.exists():
        return {}
    try:
        data = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise LorascopeError(f"{mf}: not valid JSON ({e.msg})") from None
    ex = data.get("excluded_eval_ids") or {}
    if not isinstance(ex, dict):
        raise LorascopeError(f"{mf}: 'excluded_eval_ids' must be an object of task -> list of ids")
    return ex


def _check_settings(tasks: list[str], limit, shots, batch_size) -> None:
    if not tasks:
        raise LorascopeError(f"no tasks given; known tasks: {', '.join(registry.names())}")
    for t in tasks:
        registry.validate(t)
    if len(set(tasks)) != len(tasks):
        raise LorascopeError(f"task list has duplicates: {tasks}")
    if limit is not None and limit <= 0:
        raise LorascopeError(f"limit must be a positive number of items, got {limit}")
    if shots is not None and shots < 0:
        raise LorascopeError(f"shots must be >= 0, got {shots}")
    if batch_size <= 0:
        raise LorascopeError(f"batch_size must be positive, got {batch_size}")


def _load(model: Any, tokenizer, exclude_ids: dict | None) -> tuple[Any, Any, str, dict[str, list]]:
    """(model, tokenizer, spec, excluded ids): a run dir's manifest exclusions united with ``exclude_ids``."""
    from ..models import load_model

    excluded: dict[str, list] = {}
    if isinstance(model, str):
        spec = model
        model, tokenizer = load_model(spec, merge=True)
        excluded = _excluded_ids(spec)
    else:
        name = getattr(getattr(model, "config", None), "_name_or_path", "")
        spec = f"<in-memory model {name}>" if name else "<in-memory model>"
        if tokenizer is None:
            raise LorascopeError("evaluate() got a loaded model without tokenizer=")
    for task, ids in (exclude_ids or {}).items():
        seen = {str(i) for i in excluded.get(task, [])}
        excluded[task] = list(excluded.get(task, [])) + [i for i in ids if str(i) not in seen]
    return model, tokenizer, spec, excluded


def _reference(tasks: list[str], spec: str, model, reference: Any):
    """The model kl_base compares against (default: the base model of ``spec``), or None when not needed."""
    from ..models import base_of, load_model

    if not any(uses_reference(t) for t in tasks):
        return None
    if reference is None and spec.startswith("<"):
        raise LorascopeError("kl_base on an in-memory model needs reference= (the base model)")
    if reference is None:
        reference = base_of(spec)
    if isinstance(reference, str):
        # the base evaluated against itself: reuse the loaded model instead of loading it twice
        return model if reference == spec else load_model(reference)[0]
    return reference


def _build(tasks: list[str], allow_code_execution: bool) -> list:
    """Task objects, built before any model is loaded or file written: import errors and a refused code
    execution surface first, so a refused evaluation leaves nothing behind."""
    for name in tasks:
        registry.validate(name)
        if info(name).executes_code:
            sandbox.require_opt_in(allow_code_execution, name)
    return [registry.build(t) for t in tasks]


def _task_record(name: str, task, res, shots, seconds: float) -> dict:
    """One entry of results.json's "tasks"; labels every sample with its cluster and split on the way."""
    if res.metrics_of is None:  # a task must say how its metrics follow from its samples
        raise TypeError(f"task {name} returned no metrics_of")
    label_splits(res.samples, info(name).benchmark or getattr(task, "benchmark", name))  # lm_eval: per task
    return {
        "metrics": res.metrics,
        "by_split": metrics_by_split(res.samples, res.metrics_of),
        "n": res.info.get("n", len(res.samples)),
        "shots": res.info.get("shots", shots),
        "info": res.info,
        "elapsed_s": round(seconds, 2),
    }


def _settings(reference: Any, excluded: dict, split: str | None, **options) -> dict:
    """What results.json records of an evaluation's settings (a study reuses results only when these match)."""
    return {
        **options,
        "reference": reference if isinstance(reference, str) or reference is None else "<in-memory>",
        "excluded_ids": {t: len(v) for t, v in excluded.items()},
        "split": split,
    }


def evaluate(
    model: Any,
    tasks: list[str],
    out: Path,
    *,
    tokenizer=None,
    limit: int | None = None,
    shots: int | None = None,
    samples: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    allow_code_execution: bool = False,
    reference: Any = None,
    exclude_ids: dict[str, list] | None = None,
    split: str | None = None,
    progress: bool = True,
) -> dict:
    """Run ``tasks`` on ``model`` (a spec string, or a loaded model with ``tokenizer=``) and write results.

    ``reference``: model (spec or loaded) for ``kl_base``; default: the base model of ``model``.
    ``exclude_ids``: task -> item ids to skip, on top of those a run dir's data_manifest.json excludes (pass
    the union of a study's exclusions when evaluating the base, so base and tuned score the same items).
    ``split``: score only that split's items (of those the limit keeps), e.g. "validation" for a configuration
    only chosen on; results.json's "metrics" then cover those items, and "by_split" the other split as n=0.
    """
    _check_settings(tasks, limit, shots, batch_size)
    built = _build(tasks, allow_code_execution)
    out, t0 = Path(out), time.time()
    model, tokenizer, spec, excluded = _load(model, tokenizer, exclude_ids)
    ref_model = _reference(tasks, spec, model, reference)
    options = dict(limit=limit, shots=shots, samples=samples, temperature=temperature, seed=seed)
    settings = _settings(
        reference, excluded, split, **options, batch_size=batch_size, allow_code_execution=allow_code_execution
    )
    result: dict = {"model": spec, "settings": settings, "versions": _versions(), "tasks": {}, "complete": False}
    for name, task in zip(tasks, built):
        torch.manual_seed(seed)
        ctx = EvalContext(
            model=model,
            tokenizer=tokenizer,
            model_spec=spec,
            batch_size=batch_size,
            **options,
            allow_code_execution=allow_code_execution,
            reference_model=ref_model,
            excluded_ids=excluded,
            out_dir=out / "artifacts" / samples_filename(name)[: -len(".jsonl")],
            progress=progress,
            split=split,
        )
        ts = time.time()
        res = task.run(ctx)
        result["tasks"][name] = _task_record(name, task, res, shots, time.time() - ts)
        write_samples(out / "samples" / samples_filename(name), res.samples)
        result["elapsed_s"] = round(time.time() - t0, 2)
        write_json(out / "results.partial.json", result)
    fm = forgetting_mean(result["tasks"])
    result.update(derived={"forgetting_mean": fm} if fm else {}, elapsed_s=round(time.time() - t0, 2), complete=True)
    write_json(out / "results.json", result)
    (out / "results.partial.json").unlink(missing_ok=True)
    return result


def _summary_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']}")
    for col in ("task", "metric", "value", "stderr", "n"):
        table.add_column(col)
    for name, t in result["tasks"].items():
        for k, v in t["metrics"].items():
            if "stderr" in k or v is None:
                continue
            se = t["metrics"].get(k.replace(",", "_stderr,", 1) if "," in k else f"{k}_stderr")
            table.add_row(name, k, f"{v:.4f}", f"{se:.4f}" if isinstance(se, float) else "", str(t["n"]))
    fm = result.get("derived", {}).get("forgetting_mean")
    if fm:
        table.add_row("forgetting_mean", "mean", f"{fm['value']:.4f}", f"{fm['stderr']:.4f}", "")
    Console(stderr=True).print(table)


def evaluate_cli(
    model: str,
    tasks: str,
    out: Path,
    limit: int | None = None,
    shots: int | None = None,
    samples: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    allow_code_execution: bool = False,
    reference: str | None = None,
) -> dict:
    """`lorascope eval MODEL --tasks t1,t2 --out DIR ...`: evaluate and print a summary table."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    _check_settings(names, limit, shots, batch_size)  # before loading a model
    _build(names, allow_code_execution)
    result = evaluate(
        model,
        names,
        out,
        limit=limit,
        shots=shots,
        samples=samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        allow_code_execution=allow_code_execution,
        reference=reference,
    )
    _summary_table(result)
    print(str(Path(out) / "results.json"))
    return result
