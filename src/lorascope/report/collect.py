"""Read a study directory into plain Python: runs, their records, and one long table of every eval number.

Nothing here imports torch: the report is a consumer of saved files and must work where no model can load.

Example::

    >>> study = load_study_dir(Path("studies/quick"))
    >>> study.runs[0]["label"], study.runs[0]["summary"]["tokens_per_s"]
    ('code-cpt/full/lr2e-05/s0', 118.4)
    >>> rows = metric_rows(study)   # one dict per run x checkpoint x task x metric
    >>> write_parquet(rows, Path("studies/quick/results.parquet"))
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorascopeError
from ..evals.results import read_samples
from ..fileio import atomic_write_bytes
from ..layout import CKPT_META, samples_filename

BASE = "base"
COLUMNS = (
    "run_id",
    "label",
    "method",
    "kind",
    "rank",
    "lr",
    "seed",
    "setting",
    "checkpoint",
    "tokens",
    "epoch",
    "task",
    "metric",
    "value",
    "stderr",
)


@dataclass
class Study:
    """Everything the report needs, as read from disk; absent parts are empty, never invented."""

    path: Path
    study_yaml: str = ""
    config: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)  # runs.json entries + summary/meta/manifest/loss/... per run
    base: dict | None = None  # evals/base/results.json
    evals: dict = field(default_factory=dict)  # (run_id, ckpt) -> results.json; ckpt may be 'truncate-r16'
    spectra: dict = field(default_factory=dict)  # (run_id, ckpt) -> spectrum.json
    truncations: dict = field(default_factory=dict)  # (run_id, 'r16') -> truncation.json (without per-matrix)
    commands: str = ""
    jobs: list = field(default_factory=list)  # logs/jobs.jsonl: one line per finished job (job, rc, elapsed_s)
    # samples files already read: every split, headline and table asks again, and the files do not change while
    # a report is built (read-only callers)
    _samples: dict = field(default_factory=dict, repr=False)
    replicates: dict = field(default_factory=dict, repr=False)  # (setting, task, axis) -> TestReplicates (intervals.py)

    def run(self, run_id: str) -> dict:
        return next(r for r in self.runs if r["run_id"] == run_id)

    def samples(self, run_id: str, ckpt: str | None, task: str) -> list[dict] | None:
        """Per-item records of one task of one evaluation, or None when the file is absent."""
        d = self.path / "evals" / (BASE if run_id == BASE else run_id)
        if run_id != BASE:
            d = d / ckpt
        f = d / "samples" / samples_filename(task)
        if f not in self._samples:
            self._samples[f] = read_samples(f) if f.exists() else None
        return self._samples[f]


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError as e:
        raise LorascopeError(f"{path}: not valid JSON ({e.msg})") from None


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run: the rest of the curve is still good
    return out


def checkpoint_position(run_dir: Path, ckpt: str) -> tuple[int | None, int | None]:
    """(tokens, epoch) of a checkpoint: from its lorascope.json, else parsed from its name."""
    meta = _json(run_dir / "checkpoints" / ckpt / CKPT_META) or {}
    tokens, epoch = meta.get("tokens"), meta.get("epoch")
    if tokens is None and (m := re.fullmatch(r"tok-(\d+)", ckpt)):
        tokens = int(m.group(1))
    if epoch is None and (m := re.fullmatch(r"epoch-(\d+)", ckpt)):
        epoch = int(m.group(1))
    return tokens, epoch


def method_family(method: dict) -> str:
    """'full', 'lora', or a LoRA variant ('lora-dora', 'lora-pissa'): the groups of the Pareto frontiers."""
    if method.get("kind") == "full":
        return "full"
    fam = "lora"
    if method.get("init", "gaussian") != "gaussian":
        fam += f"-{method['init']}"
    if method.get("use_dora"):
        fam += "-dora"
    return fam


def load_study_dir(path: Path) -> Study:
    path = Path(path)
    if not path.is_dir():
        raise LorascopeError(f"study directory '{path}' does not exist")
    if not (path / "runs.json").exists() and not (path / "study.yaml").exists():
        raise LorascopeError(f"{path}: not a study directory (no runs.json or study.yaml)")
    st = Study(path=path)
    if (path / "study.yaml").exists():
        import yaml

        st.study_yaml = (path / "study.yaml").read_text(encoding="utf-8")
        st.config = yaml.safe_load(st.study_yaml) or {}
    st.commands = (path / "commands.txt").read_text(encoding="utf-8") if (path / "commands.txt").exists() else ""
    st.base = _json(path / "evals" / BASE / "results.json")
    st.jobs = _jsonl(path / "logs" / "jobs.jsonl")
    for r in _json(path / "runs.json") or []:
        run = {k: v for k, v in r.items() if k != "config"}
        run["config"] = r.get("config", {})
        rd = path / "runs" / r["run_id"]
        run["dir"] = rd
        run["family"] = method_family(r.get("method", {}))
        run["complete"] = (rd / "COMPLETE").exists()
        run["diverged"] = (rd / "DIVERGED").read_text().strip() if (rd / "DIVERGED").exists() else None
        run["summary"] = _json(rd / "summary.json")
        run["meta"] = _json(rd / "meta.json")
        run["manifest"] = _json(rd / "data_manifest.json")
        run["loss"] = _jsonl(rd / "loss.jsonl")
        st.runs.append(run)
        ev = path / "evals" / r["run_id"]
        if ev.is_dir():
            for d in sorted(x for x in ev.iterdir() if x.is_dir()):
                res = _json(d / "results.json")
                if res is not None:
                    st.evals[(r["run_id"], d.name)] = res
        an = path / "analysis" / r["run_id"]
        if an.is_dir():
            for d in sorted(x for x in an.iterdir() if x.is_dir()):
                sp = _json(d / "spectrum.json")
                if sp is not None:
                    st.spectra[(r["run_id"], d.name)] = sp
            tr = an / "truncate"
            if tr.is_dir():
                for d in sorted(x for x in tr.iterdir() if x.is_dir()):
                    doc = _json(d / "truncation.json")
                    if doc is not None:
                        doc.pop("matrices", None)
                        st.truncations[(r["run_id"], d.name)] = doc
    return st


def stderr_key(metric: str) -> str:
    """lm-eval's naming: 'acc,none' -> 'acc_stderr,none'; 'bpb' -> 'bpb_stderr'."""
    base, sep, filt = metric.partition(",")
    return f"{base}_stderr,{filt}" if sep else f"{metric}_stderr"


def _finite(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def result_metrics(res: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of one results.json, the paper's forgetting_mean included."""
    out = []
    for task, t in (res.get("tasks") or {}).items():
        m = t.get("metrics") or {}
        for k, v in m.items():
            if "_stderr" in k or _finite(v) is None:
                continue
            out.append((task, k, float(v), _finite(m.get(stderr_key(k)))))
    fm = (res.get("derived") or {}).get("forgetting_mean")
    if fm and _finite(fm.get("value")) is not None:
        out.append(("forgetting_mean", "mean", float(fm["value"]), _finite(fm.get("stderr"))))
    return out


def metric_rows(st: Study) -> list[dict]:
    """The long table: one row per run x checkpoint x task x metric (base rows have run_id 'base')."""
    rows = []
    if st.base:
        for task, metric, v, se in result_metrics(st.base):
            rows.append(
                {
                    "run_id": BASE,
                    "label": BASE,
                    "method": BASE,
                    "kind": BASE,
                    "rank": None,
                    "lr": None,
                    "seed": None,
                    "setting": None,
                    "checkpoint": BASE,
                    "tokens": 0,
                    "epoch": 0,
                    "task": task,
                    "metric": metric,
                    "value": v,
                    "stderr": se,
                }
            )
    for (rid, ck), res in st.evals.items():
        run = st.run(rid)
        m = run.get("method", {})
        if ck.startswith("truncate-"):
            # a truncation of the run's final checkpoint: same training position as that checkpoint
            src = st.truncations.get((rid, ck.removeprefix("truncate-")), {}).get("checkpoint")
            tokens, epoch = checkpoint_position(run["dir"], src) if src else (None, None)
        else:
            tokens, epoch = checkpoint_position(run["dir"], ck)
        for task, metric, v, se in result_metrics(res):
            rows.append(
                {
                    "run_id": rid,
                    "label": run.get("label", rid),
                    "method": run.get("method_name"),
                    "kind": m.get("kind"),
                    "rank": m.get("rank") if m.get("kind") != "full" else None,
                    "lr": run.get("lr"),
                    "seed": run.get("seed"),
                    "setting": run.get("setting"),
                    "checkpoint": ck,
                    "tokens": tokens,
                    "epoch": epoch,
                    "task": task,
                    "metric": metric,
                    "value": v,
                    "stderr": se,
                }
            )
    return rows


def write_parquet(rows: list[dict], path: Path, verdicts: str | None = None) -> Path:
    """results.parquet with a fixed schema (so an empty study still yields a readable file), atomically;
    verdicts: the verdicts.json text, kept in the file's metadata under "lorascope.verdicts" (the same records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("run_id", pa.string()),
            ("label", pa.string()),
            ("method", pa.string()),
            ("kind", pa.string()),
            ("rank", pa.int64()),
            ("lr", pa.float64()),
            ("seed", pa.int64()),
            ("setting", pa.string()),
            ("checkpoint", pa.string()),
            ("tokens", pa.int64()),
            ("epoch", pa.int64()),
            ("task", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("stderr", pa.float64()),
        ]
    )
    if verdicts is not None:
        schema = schema.with_metadata({"lorascope.verdicts": verdicts})
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())
    return path
