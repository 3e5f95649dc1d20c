"""Experiment tracking through accelerate's trackers: MLflow, TensorBoard, W&B, Trackio (``tracking:`` in a run
or study file; lorascope.config.TrackingConfig).

    tracker = start(cfg.tracking, RUN, dump(cfg))       # one tracked run per training run (resumed by id)
    tracker.log_step(line)                              # each loss.jsonl line: loss, lr, grad norm, tokens/s
    tracker.finish()                                    # summary.json's numbers; the tracked run is closed
    log_checkpoint_eval(RUN, "tok-000000004096", results)   # later, in an evaluation job's own process
    log_study(STUDY)                                    # after `lorascope report`: verdicts, recommendation

Which tracked runs a run or study writes to is kept in its ``tracking.json`` (the MLflow run id, the W&B id,
the TensorBoard directory), so a resumed run and the evaluation jobs of its checkpoints log into the same run,
each checkpoint's metrics at that checkpoint's optimizer step.

Tracking only reads what the loop has computed, and never stops a run: a backend that fails (down, refused,
misconfigured, not installed) is dropped with one ``TrackingWarning`` and the run goes on without it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
import warnings
from pathlib import Path

from lorascope.config import TrackingConfig
from lorascope.fileio import atomic_write_json
from lorascope.layout import CKPT_META

RECORD = "tracking.json"
"""In a run or study directory: the tracked runs it writes to, by backend."""


class TrackingWarning(UserWarning):
    """A tracking backend failed; the run goes on without it."""


def _warn(backend: str, what: str, err: BaseException) -> None:
    why = str(err).splitlines()[0] if str(err) else type(err).__name__
    warnings.warn(f"tracking: {backend}: {what} failed ({why}); going on without it", TrackingWarning, stacklevel=3)


def _metric_key(key: str) -> str:
    """A name every backend accepts ('eval/heldout_bpb:code-cpt/bpb' -> 'eval/heldout_bpb_code-cpt/bpb')."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def flat_params(resolved: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config -> {'method.rank': 16, 'train.betas': '[0.9, 0.95]'} (lists and None as text)."""
    out: dict = {}
    for k, v in resolved.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    return out


def _numbers(d: dict, prefix: str) -> dict[str, float]:
    return {
        _metric_key(prefix + k): float(v)
        for k, v in d.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------------------------------------------------
# MLflow through its client: explicit run ids, no process-wide active run (a study may train several runs in one
# process, and a dead server must not leave a half-ended run behind for the next one)


def _mlflow_quick_failure() -> None:
    """A down server costs seconds, not MLflow's default minutes of retries (the user's settings win)."""
    for var, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
    ):
        os.environ.setdefault(var, value)


def _tracker_base():
    from accelerate.tracking import GeneralTracker

    return GeneralTracker


def mlflow_tracker(experiment: str, uri: str | None, run_name: str, tags: dict, run_id: str | None = None):
    """An accelerate tracker writing to MLflow run ``run_id`` (created in ``experiment`` if None)."""

    class MLflowClientTracker(_tracker_base()):
        name = "mlflow"
        requires_logging_directory = False
        main_process_only = True

        def connect(self):
            from mlflow import MlflowClient

            _mlflow_quick_failure()
            self.client, self.run_id = MlflowClient(uri), run_id

        def start(self):
            self.connect()
            if self.run_id is None:
                exp = _get_or_create_experiment(self.client, experiment)
                self.run_id = self.client.create_run(exp, run_name=run_name, tags=tags).info.run_id
            else:
                self.client.update_run(self.run_id, status="RUNNING")

        @property
        def tracker(self):
            return self.client

        def store_init_configuration(self, values: dict):
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in values.items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i : i + 100])

        def log(self, values: dict, step: int | None = None, **kwargs):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            nums = _numbers(values, "")
            metrics = [Metric(k, v, now, step or 0) for k, v in nums.items()]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            for k, v in values.items():
                if isinstance(v, str):
                    self.client.set_tag(self.run_id, _metric_key(k), v[:8000])

        def finish(self, status: str = "FINISHED"):
            self.client.set_terminated(self.run_id, status)

        def record(self) -> dict:
            return {"uri": self.client.tracking_uri, "run_id": self.run_id}

    return MLflowClientTracker()


def _get_or_create_experiment(client, name: str) -> str:
    """The experiment's id; two jobs creating it at once both get it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created by another job meanwhile; anything else fails below too
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------------------
# one tracked run per backend, made from the config and the ids recorded by an earlier session


def _make(backend: str, cfg: TrackingConfig, where: Path, old: dict):
    """(accelerate tracker, its record) for ``backend``; ``old``: the record of an earlier session, if any."""
    from accelerate import tracking as acc

    name, project = cfg.run_name or "run", cfg.project or "lorascope"
    if backend == "mlflow":
        old = old if cfg.uri in (None, old.get("uri")) else {}  # another server now: a new tracked run there
        t = mlflow_tracker(project, old.get("uri", cfg.uri), name, dict(cfg.tags), old.get("run_id"))
        return t, t.record
    if backend == "tensorboard":
        root = Path(cfg.logging_dir) if cfg.logging_dir else where / "tensorboard"
        t = acc.TensorBoardTracker(name, str(root))
        return t, lambda: {"logdir": t.logging_dir}
    if backend == "wandb":
        rid = old.get("id") or uuid.uuid4().hex[:16]
        group, tags = cfg.tags.get("lorascope.study"), [f"{k}={v}" for k, v in cfg.tags.items()]
        t = acc.WandBTracker(project, name=name, id=rid, resume="allow", group=group, tags=tags, dir=str(where))
        return t, lambda: {"project": project, "id": rid, "dir": str(where)}
    t = acc.TrackioTracker(project, name=name, resume="allow")
    return t, lambda: {"project": project, "name": name}


class RunTracker:
    """The tracked runs of one training run (none when tracking is off or on a non-main process)."""

    def __init__(self, out: Path | None = None, trackers: dict | None = None):
        self.out, self.trackers = out, trackers or {}

    def _each(self, what: str, call) -> None:
        for backend, t in list(self.trackers.items()):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - any backend failure: warn, drop it, train on
                _warn(backend, what, e)
                self.trackers.pop(backend)

    def log_step(self, line: dict) -> None:
        """One loss.jsonl line as train/* metrics at its optimizer step."""
        if self.trackers:
            keys = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens")
            values = {f"train/{k}": line[k] for k in keys if line.get(k) is not None}
            self._each("logging step", lambda t: t.log(values, step=line["step"]))

    def finish(self) -> None:
        """summary.json's numbers as summary/* (when the run completed), then each tracked run is closed."""
        if not self.trackers:
            return
        done = (self.out / "COMPLETE").exists()
        if done and (self.out / "summary.json").exists():
            s = json.loads((self.out / "summary.json").read_text())
            self._each("logging the summary", lambda t: t.log(_numbers(s, "summary/"), step=s.get("steps")))
        for backend, t in list(self.trackers.items()):
            try:
                t.finish("FINISHED" if done else "FAILED") if backend == "mlflow" else t.finish()
            except Exception as e:  # noqa: BLE001
                _warn(backend, "closing the run", e)
        self.trackers = {}


def open_trackers(cfg: TrackingConfig, where: Path, params: dict) -> tuple[dict, dict]:
    """Start each backend of ``cfg`` in ``where`` (resuming the tracked runs its tracking.json names) and log
    ``params``; returns ({backend: tracker}, the new record). A backend that fails is left out with a warning."""
    old = _read_record(where)
    trackers, record = {}, {}
    for backend in cfg.log_with:
        try:
            t, rec = _make(backend, cfg, where, old.get(backend, {}))
            t.start()
            record[backend] = rec()
            t.store_init_configuration(params)
            trackers[backend] = t
        except Exception as e:  # noqa: BLE001 - not installed, unreachable, refused: the run goes on
            _warn(backend, "starting the run", e)
    if record:
        atomic_write_json(where / RECORD, {**old, **record})
    return trackers, record


def start(cfg: TrackingConfig | None, out: Path, resolved: dict, main: bool = True) -> RunTracker:
    """The tracked runs of training run ``out`` (its resolved config logged as params); inert when off."""
    if cfg is None or not cfg.log_with or not main:
        return RunTracker()
    cfg = cfg.model_copy(update={"run_name": cfg.run_name or Path(out).resolve().name})
    trackers, _ = open_trackers(cfg, Path(out), flat_params(resolved))
    return RunTracker(Path(out), trackers)


def _read_record(where: Path) -> dict:
    f = Path(where) / RECORD
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------------------
# evaluation jobs: into the run's tracked runs, by id, at the checkpoint's step


def eval_metrics(results: dict) -> dict[str, float]:
    """results.json -> {'eval/<task>/<metric>': v, 'eval/<task>/<split>/<metric>': v, 'eval/<derived>': v}."""
    out: dict[str, float] = {}
    for task, r in (results.get("tasks") or {}).items():
        out.update(_numbers(r.get("metrics") or {}, f"eval/{task}/"))
        for split, m in (r.get("by_split") or {}).items():
            out.update(_numbers(m if isinstance(m, dict) else {}, f"eval/{task}/{split}/"))
    for name, d in (results.get("derived") or {}).items():  # e.g. forgetting_mean: {value, stderr, ...}
        out.update(_numbers(d, f"eval/{name}/") if isinstance(d, dict) else {})
    return out


def log_checkpoint_eval(run_dir: Path, ckpt: str, results: dict) -> None:
    """Log a checkpoint's evaluation into the tracked runs its training run wrote (none: nothing to do)."""
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    meta = run_dir / "checkpoints" / ckpt / CKPT_META
    if not record or not meta.exists():
        return
    step = json.loads(meta.read_text())["step"]
    values = eval_metrics(results)
    for backend, rec in record.items():
        try:
            _LATE[backend](rec, values, step)
        except Exception as e:  # noqa: BLE001 - an evaluation is never lost to its tracker
            _warn(backend, f"logging {ckpt}'s evaluation", e)


def _late_mlflow(rec: dict, values: dict, step: int) -> None:
    t = mlflow_tracker("", rec["uri"], "", {}, rec["run_id"])
    t.connect()  # log only: the run's status stays as it is
    t.log(values, step=step)


def _late_tensorboard(rec: dict, values: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(rec["logdir"]) as w:  # a new event file in the run's own directory
        for k, v in values.items():
            w.add_scalar(k, v, step)


def _late_wandb(rec: dict, values: dict, step: int) -> None:
    import wandb

    run = wandb.init(project=rec["project"], id=rec["id"], resume="allow", dir=rec.get("dir"))
    run.define_metric("checkpoint_step")  # W&B's own step only grows: evaluations have their own axis
    run.define_metric("eval/*", step_metric="checkpoint_step")
    run.log({**values, "checkpoint_step": step})
    run.finish()


def _late_trackio(rec: dict, values: dict, step: int) -> None:
    import trackio

    run = trackio.init(project=rec["project"], name=rec["name"], resume="allow")
    run.log(values, step=step)
    run.finish()


_LATE = {"mlflow": _late_mlflow, "tensorboard": _late_tensorboard, "wandb": _late_wandb, "trackio": _late_trackio}


# ---------------------------------------------------------------------------------------------------------
# the study-level run: what `lorascope report` concluded


def study_conclusions(study_dir: Path) -> dict[str, str | float]:
    """verdict/<setting>/<question>/<method> (and the numbers behind each) from verdicts.json when the report
    wrote one, else the verdicts of report.html's headline; recommendation/<setting> from the headline."""
    study_dir = Path(study_dir)
    heads = _headline(study_dir / "report.html")
    out: dict[str, str | float] = {f"recommendation/{s}": h["recommendation"] for s, h in heads.items()}
    verdicts = study_dir / "verdicts.json"
    if verdicts.exists():
        for c in _comparisons(json.loads(verdicts.read_text())):
            key = "/".join(str(c.get(k)) for k in ("setting", "question", "method"))
            out[f"verdict/{key}"] = str(c["verdict"])
            out.update(_numbers({k: c.get(k) for k in ("estimate", "ci_low", "ci_high", "p_holm")}, f"{key}/"))
    else:
        for s, h in heads.items():
            out.update({f"verdict/{s}/{q}": v for q, v in h["verdicts"].items()})
    return out  # keys as written; each backend's tracker makes them names it accepts


def _comparisons(data) -> list[dict]:
    """Every record with a verdict, wherever verdicts.json nests them."""
    if isinstance(data, dict) and "verdict" in data and "setting" in data:
        return [data]
    items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else []
    return [c for v in items for c in _comparisons(v)]


def _headline(page: Path) -> dict[str, dict]:
    """{setting: {"verdicts": {question: answer}, "recommendation": text}} from the headline's summary boxes
    (report/templates/headline.html: 'Setting <b>S</b>', one <li> per question, the recommendation's <p>)."""
    import html

    def text(fragment: str) -> str:
        return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())

    out: dict[str, dict] = {}
    for box in re.findall(r'<div class="summary">(.*?)</div>', page.read_text() if page.exists() else "", re.S):
        setting = re.search(r"Setting <b>(.*?)</b>", box, re.S)
        rec = re.search(r'<p class="(?:rec|abstain)">(.*?)</p>', box, re.S)
        answers = re.findall(r'<li>(.*?)<b class="answer">(.*?)</b>', box, re.S)
        if setting:
            out[text(setting.group(1))] = {
                "verdicts": {text(q): text(a) for q, a in answers},
                "recommendation": text(rec.group(1)) if rec else "",
            }
    return out


def log_study(study_dir: Path) -> None:
    """The study-level tracked run (one per study, resumed by id): its conclusions after `lorascope report`.
    Does nothing when the study file has no tracking."""
    import yaml

    study_dir = Path(study_dir)
    spec = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
    cfg = TrackingConfig.model_validate(spec.get("tracking") or {})
    if not cfg.log_with:
        return
    name = spec.get("name", "study")
    tags = {**cfg.tags, "lorascope.study": name, "lorascope.kind": "study"}
    cfg = cfg.model_copy(update={"project": cfg.project or name, "run_name": cfg.run_name or name, "tags": tags})
    params = {"study": name, "model": str(spec.get("model")), "seeds": json.dumps(spec.get("seeds"))}
    trackers, _ = open_trackers(cfg, study_dir, params)
    conclusions = study_conclusions(study_dir)
    RunTracker(study_dir, trackers)._each("logging the conclusions", lambda t: t.log(conclusions, step=0))
    for backend, t in trackers.items():
        try:
            t.finish()
        except Exception as e:  # noqa: BLE001
            _warn(backend, "closing the study run", e)
