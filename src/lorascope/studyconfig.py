"""The study file: one YAML describing a whole grid (settings x methods x learning rates x seeds) and what is
measured on it. Validated strictly; every error names its place, e.g.::

    configs/x.yaml: methods[2].method.rnk: unknown field

Example (see configs/quick.yaml for a documented one)::

    name: quick
    model: embedded
    seeds: [0]
    settings:
      - name: code-cpt
        data: {dataset: code-cpt}
        train: {seq_len: 256, batch_size: 4, max_tokens: 16384, checkpoints: [4096, 8192]}
    methods:
      - {name: full, method: {kind: full}, lrs: [2.0e-5]}
      - {name: lora-r16, method: {kind: lora, rank: 16}, lrs: [2.0e-4]}
    evals:
      checkpoints: all
      groups:
        - {tasks: [heldout_bpb:code-cpt, english_bpb, kl_base], limit: 64}
    analysis:
      spectrum: {checkpoints: final}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import DataConfig, MethodConfig, RunConfig, TrainConfig, dump, parse_value, read_yaml
from .errors import ConfigError
from .evals.results import FORGETTING_PARTS
from .trainplan import checkpoint_names as planned_checkpoint_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Setting(_Strict):
    """A regime x domain: its data and its training budget/schedule (shared by every method)."""

    name: str
    data: DataConfig
    train: TrainConfig
    separate_runs: bool = False
    """Train every budget (train.checkpoints + the end) as its own run with its own full schedule, as the paper
    does for IFT (separate 1/2/4/8/16-epoch runs with cosine decay); default: one run saving checkpoints."""


class MethodEntry(_Strict):
    name: str
    method: MethodConfig
    lrs: list[float] | dict[str, list[float]]
    """Learning rates to run; or per setting name ({code-ift: [2e-4], default: [1e-5]})."""
    train: dict = Field(default_factory=dict)
    """Per-method TrainConfig overrides (e.g. weight_decay for the regularisation baselines)."""


class EvalGroup(_Strict):
    tasks: list[str] = Field(min_length=1)
    checkpoints: Literal["all", "final"] | None = None
    """Which checkpoints this group runs on; default: evals.checkpoints (e.g. costly tasks on 'final' only)."""
    limit: int | None = None
    shots: int | None = None
    samples: int | None = None
    temperature: float | None = None
    allow_code_execution: bool = False


class Evals(_Strict):
    checkpoints: Literal["all", "final"] = "all"
    base: bool = True
    batch_size: int = 8
    groups: list[EvalGroup] = Field(default_factory=list)


class SpectrumSpec(_Strict):
    checkpoints: Literal["all", "final"] = "final"
    energy: float = Field(0.9, gt=0, lt=1)
    top_k: int = 10
    epsilon: float = 0.5


class TruncateSpec(_Strict):
    ranks: list[int | str] = Field(default_factory=lambda: [16, 64])
    evaluate: bool = True


class Analysis(_Strict):
    spectrum: SpectrumSpec | None = None
    truncate: TruncateSpec | None = None


class ReportSpec(_Strict):
    """Headline metrics of the report; unset = the paper's choice (its benchmark, else held-out BPB; forgetting_mean)."""
    learning: str | None = None
    forgetting: str | None = None


class StudyConfig(_Strict):
    name: str = "study"
    model: str = "embedded"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    settings: list[Setting] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    evals: Evals = Field(default_factory=Evals)
    analysis: Analysis = Field(default_factory=Analysis)
    report: ReportSpec = Field(default_factory=ReportSpec)
    divergence_factor: float = 1.5
    """A run whose final loss exceeds its first loss x this factor (or goes non-finite) is 'diverged'."""

    @model_validator(mode="after")
    def _check(self) -> "StudyConfig":
        from .evals import registry

        for gi, g in enumerate(self.evals.groups):
            for ti, t in enumerate(g.tasks):
                try:
                    registry.validate(t)
                except Exception as e:
                    raise ValueError(f"evals.groups[{gi}].tasks[{ti}]: {e}") from None
        for si, s in enumerate(self.settings):
            t = s.train
            end, what = (t.epochs, "epochs") if s.data.regime == "ift" and t.epochs else (t.max_tokens, "max_tokens")
            if end is not None and t.checkpoints and t.checkpoints[-1] >= end:
                raise ValueError(f"settings[{si}].train.checkpoints: budgets must be increasing and below "
                                 f"{what}={end} (got {t.checkpoints})")
        evaluated = {t for g in self.evals.groups for t in g.tasks}
        if {task for task, _ in FORGETTING_PARTS} <= evaluated:
            evaluated.add("forgetting_mean")
        for field in ("learning", "forgetting"):
            want = getattr(self.report, field)
            if want is not None and want not in evaluated:
                raise ValueError(f"report.{field}: '{want}' is not evaluated in any evals group "
                                 f"(evaluated: {sorted(evaluated)})")
        settings = {s.name for s in self.settings}
        for mi, m in enumerate(self.methods):
            grid = m.lrs.values() if isinstance(m.lrs, dict) else [m.lrs]
            if not all(grid) or not grid:
                raise ValueError(f"methods[{mi}].lrs: empty")
            if isinstance(m.lrs, dict):
                unknown = set(m.lrs) - settings - {"default"}
                if unknown:
                    raise ValueError(f"methods[{mi}].lrs: unknown setting(s) {sorted(unknown)} (settings: "
                                     f"{sorted(settings)}, or 'default')")
                missing = [s for s in settings if s not in m.lrs and "default" not in m.lrs]
                if missing:
                    raise ValueError(f"methods[{mi}].lrs: no learning rate for setting(s) {sorted(missing)}")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be unique (got {names})")
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def apply_study_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=v`` overrides like lorascope.config.apply_overrides, where a number indexes a list
    (``settings.0.train.max_tokens=4096``) and ``*`` means every item (``methods.*.lrs=[1e-4]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        value, parts = parse_value(text), key.strip().split(".")
        nodes = [data]
        for i, p in enumerate(parts[:-1]):
            nxt = []
            for n in nodes:
                if isinstance(n, list):
                    if p == "*":
                        nxt += n
                    elif p.isdigit() and int(p) < len(n):
                        nxt.append(n[int(p)])
                    else:
                        raise ConfigError(f"{key}: '{p}' is not an index of {'.'.join(parts[:i]) or 'the list'} "
                                          f"(0..{len(n) - 1} or *)")
                elif isinstance(n, dict) and isinstance(n.get(p, {}), (dict, list)):
                    nxt.append(n.setdefault(p, {}))
                else:
                    raise ConfigError(f"{key}: '{p}' is not a section")
            nodes = nxt
        for n in nodes:
            if not isinstance(n, dict):
                raise ConfigError(f"{key}: '{parts[-1]}' must name a field, not a list item")
            n[parts[-1]] = value
    return data


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read, override and validate a study file; ConfigError names the file and the place."""
    data = read_yaml(path)
    apply_study_overrides(data, list(overrides))
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            loc = _loc(err["loc"])
            msgs.append(f"{loc}: {msg}" if loc else msg)
        raise ConfigError(f"{path}: " + "; ".join(msgs)) from None


# ---------------------------------------------------------------------------------------------------------
# grid expansion


def run_id(cfg: RunConfig) -> str:
    """Stable id: a short hash of the resolved run config."""
    return hashlib.sha1(json.dumps(dump(cfg), sort_keys=True).encode()).hexdigest()[:10]


def expand(study: StudyConfig) -> list[dict]:
    """One record per training run: run_id, label, the RunConfig and what the report needs to group runs
    (setting, method_name, lr, seed; with separate_runs, the runs of one group differ only in "budget")."""
    runs = []
    for s in study.settings:
        for m in study.methods:
            lrs = m.lrs.get(s.name, m.lrs.get("default")) if isinstance(m.lrs, dict) else m.lrs
            for lr in lrs:
                for seed in study.seeds:
                    for budget in _budgets(s):
                        train = {**dump(s.train), **m.train, "lr": lr, "seed": seed, **(budget or {})}
                        try:
                            cfg = RunConfig(model=study.model, method=m.method, data=s.data,
                                            train=TrainConfig.model_validate(train))
                        except ValidationError as e:
                            raise ConfigError(f"methods[{m.name}].train: {e.errors()[0]['msg']}") from None
                        label = f"{s.name}/{m.name}/lr{lr:g}/s{seed}"
                        if budget:
                            label += f"/e{budget['epochs']}" if "epochs" in budget else f"/t{budget['max_tokens']}"
                        runs.append({"run_id": run_id(cfg), "label": label, "setting": s.name,
                                     "method_name": m.name, "method": dump(m.method), "lr": lr, "seed": seed,
                                     "regime": s.data.regime, "dataset": s.data.dataset, "budget": budget,
                                     "config": dump(cfg)})
    if not runs:
        raise ConfigError("the study grid is empty")
    return runs


def _budgets(s: Setting) -> list[dict | None]:
    """[None] (one run), or one train override per budget when the setting trains each as its own run."""
    if not s.separate_runs:
        return [None]
    t = s.train
    if s.data.regime == "ift" and t.epochs:
        return [{"epochs": e, "checkpoints": []} for e in [*t.checkpoints, t.epochs]]
    return [{"max_tokens": b, "checkpoints": []} for b in [*t.checkpoints, t.max_tokens]]


def checkpoint_names(cfg: RunConfig) -> list[str]:
    """Names of the checkpoints a run will write, known before it trains (the training plan's own rule)."""
    return planned_checkpoint_names(cfg.train)
