"""Metric aggregation and the on-disk result files (results.json, samples/TASK.jsonl), written atomically.

Torch-free, so the report can import it. Every sample line carries ``cluster`` (items that must stay on one
side of the split: "<benchmark>/<item id>" for benchmark items, the source file for held-out text windows, the
text id for English texts) and ``split`` (lorascope.splits.split_of(cluster)); ``metrics_by_split`` recomputes
a task's metrics from the sample lines of each split alone.

Example::

    >>> mean_stderr([1.0, 0.0, 1.0, 1.0])
    (0.75, 0.25)
    >>> forgetting_mean({"hellaswag": {"metrics": {"acc_norm,none": 0.4}},
    ...                  "arc_challenge": {"metrics": {"acc_norm,none": 0.3}},
    ...                  "winogrande": {"metrics": {"acc,none": 0.5}}})["value"]
    0.4
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import LorascopeError
from ..fileio import atomic_write_text
from ..splits import SPLITS, split_of
from .catalog import FORGETTING_PARTS


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and lm-eval's stderr of the mean: sample std (n-1) / sqrt(n); NaN stderr when n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mu = sum(values) / n
    if n < 2:
        return mu, float("nan")
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return mu, math.sqrt(var) / math.sqrt(n)


def token_weighted_mean(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """Token-weighted mean sum(s)/sum(n) and its standard error with texts as clusters (ratio estimator)."""
    total = sum(counts)
    if not total:
        return math.nan, math.nan
    r, m = sum(sums) / total, len(counts)
    if m < 2:
        return r, math.nan
    var = sum((s - r * n) ** 2 for s, n in zip(sums, counts)) / (m * (m - 1))
    return r, math.sqrt(var) / (total / m)


def select_items(docs: list[dict], excluded: Iterable, limit: int | None) -> list[dict]:
    """Drop excluded ids (compared as strings, so JSON round-trips match), then keep the first ``limit``."""
    ex = {str(e) for e in excluded}
    kept = [d for d in docs if str(d["id"]) not in ex] if ex else docs
    return kept[:limit] if limit is not None else kept


def in_split(split: str | None, cluster: str) -> bool:
    """Whether an item of ``cluster`` is scored by an evaluation restricted to ``split`` (None: every item)."""
    return split is None or split_of(cluster) == split


def items_in_split(docs: list[dict], split: str | None, benchmark: str) -> list[dict]:
    """The docs ({"id", optional "cluster"}) of ``split``, their clusters as label_splits gives them. Applied after
    the limit, so a split's items are the same ones an unrestricted evaluation puts in that split."""
    return [d for d in docs if in_split(split, d.get("cluster") or f"{benchmark}/{d['id']}")]


def label_splits(samples: list[dict], benchmark: str) -> None:
    """Give every sample its cluster (default "<benchmark>/<id>": one item, one cluster) and its split."""
    for rec in samples:
        rec.setdefault("cluster", f"{benchmark}/{rec['id']}")
        rec["split"] = split_of(rec["cluster"])


def metrics_by_split(samples: list[dict], metrics_of: Callable[[list[dict]], dict]) -> dict:
    """{split: {<metric>: value, ..., "n": distinct items}} from each split's own sample lines."""
    keys = list(metrics_of(samples)) if samples else []
    out = {}
    for split in SPLITS:
        part = [s for s in samples if s["split"] == split]
        m = metrics_of(part) if part else {k: math.nan for k in keys}
        out[split] = {**m, "n": len({str(s["id"]) for s in part})}
    return out


def forgetting_mean(tasks: dict) -> dict | None:
    """The paper's forgetting score when all three forgetting tasks ran: mean of hellaswag acc_norm,
    arc_challenge acc_norm and winogrande acc; stderr from the parts assuming independence."""
    parts = {}
    for task, key in FORGETTING_PARTS:
        m = tasks.get(task, {}).get("metrics", {})
        if key not in m:
            return None
        parts[task] = (m[key], m.get(key.replace(",", "_stderr,", 1), float("nan")))
    value = sum(v for v, _ in parts.values()) / 3
    stderr = math.sqrt(sum(se**2 for _, se in parts.values())) / 3
    return {
        "value": value,
        "stderr": stderr,
        "definition": "mean(hellaswag acc_norm, arc_challenge acc_norm, winogrande acc)",
        "parts": {t: v for t, (v, _) in parts.items()},
    }


def _json_safe(x):
    # NaN is not JSON; undefined numbers (e.g. stderr of one item) are written as null
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, ensure_ascii=False) + "\n")


def write_samples(path: Path, samples: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_json_safe(s), ensure_ascii=False) + "\n" for s in samples))


def read_samples(path: Path) -> list[dict]:
    """Per-item records of a task; LorascopeError naming the file and line if it is corrupt."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LorascopeError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise LorascopeError(f"{path}: line {lineno} is not a JSON object")
                    out.append(rec)
    except FileNotFoundError:
        raise LorascopeError(f"samples file '{path}' does not exist") from None
    return out


def read_results(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorascopeError(f"results file '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise LorascopeError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "tasks" not in data:
        raise LorascopeError(f"{path}: not a lorascope results file (no 'tasks')")
    return data
