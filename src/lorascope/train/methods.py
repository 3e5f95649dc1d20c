"""Methods as data: one MethodConfig -> full fine-tuning or a peft LoRA variant (LoRA is never re-implemented).

    model = apply_method(base_model, MethodConfig(kind="lora", rank=16, targets="all"), work_dir=run / "init")
    groups = param_groups(model, method, lr=2e-4, weight_decay=0.0)   # LoRA+ / embedding LRs as param groups
    save_checkpoint(model, method, run / "checkpoints/tok-000000008192", "embedded", {"tokens": 8192})

Variants map to peft.LoraConfig fields: init gaussian|pissa|olora|loftq -> init_lora_weights, use_dora,
use_rslora; LoRA+ is a param-group rule (B matrices get lr * ratio, as peft's create_loraplus_optimizer).

Tied embeddings (SmolLM2 ties embed_tokens and lm_head): ``train_embed_tokens`` or ``train_lm_head`` trains the
ONE shared matrix as a full copy (peft modules_to_save on embed_tokens with ensure_weight_tying), so lm_head stays
identical to embed_tokens after training, saving, reloading and merging. The adapter then carries that whole
matrix (28M parameters for SmolLM2, ~113 MB in fp32), written by peft under both names (~226 MB): a warning says
so. Untied models: each flag adds its own module (embed_tokens and/or lm_head).

Inits that move the base weights (PiSSA, OLoRA) are saved through peft's
``path_initial_model_for_weight_conversion``: the saved adapter (rank 2r) applies to the ORIGINAL base, so
``PeftModel.from_pretrained(original_base, ckpt)`` and dW = merged - original base are both right. That
conversion keeps only the LoRA matrices, so PiSSA/OLoRA with DoRA or trained embeddings is refused up front.

Every LoRA model built here gets ``lora_layers.speed_up``: one dropout mask per input tensor (shared by
the adapters reading it) and the plain LoRA update fused into the base output; both equal peft's LoRA up to
float rounding (that module says how, and what each saved).

LoftQ (peft 0.21) needs CUDA and bitsandbytes; elsewhere it is refused with a one-line reason. LoftQ replaces
the base weights by their quantised copy, which no adapter conversion can express; LoftQ checkpoints are
therefore saved as merged full models (kind "full", with ``adapter_init: loftq`` in the metadata).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from lorascope.config import MethodConfig
from lorascope.errors import ConfigError, LorascopeError
from lorascope.fileio import atomic_dir, atomic_write_json
from lorascope.layout import CKPT_META

log = logging.getLogger(__name__)
_INIT = {"gaussian": True, "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
_MOVES_BASE = ("pissa", "olora")


def _linear_leaf_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def apply_method(model, m: MethodConfig, work_dir: Path | None = None):
    """Return the model to train: the model itself (full FT) or a PeftModel (LoRA variants)."""
    if m.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if m.attention_dropout:
            # Llama copies config.attention_dropout into each attention module at construction time.
            model.config.attention_dropout = m.attention_dropout
            for mod in model.modules():
                if hasattr(mod, "attention_dropout"):
                    mod.attention_dropout = m.attention_dropout
        return model

    from peft import LoraConfig, get_peft_model

    from lorascope.train.lora_layers import speed_up

    _check_lora(model, m, work_dir)
    modules_to_save, tie = _modules_to_save(model, m)
    cfg = LoraConfig(
        r=m.rank,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.dropout,
        target_modules=m.target_modules,
        use_rslora=m.use_rslora,
        use_dora=m.use_dora,
        init_lora_weights=_INIT[m.init],
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=tie,
        task_type="CAUSAL_LM",
        **_loftq_fields(m),
    )
    was_training = model.training
    try:
        pm = get_peft_model(model, cfg)
    except (ValueError, ImportError, RuntimeError) as e:
        raise LorascopeError(f"method: peft could not build {m.label()}: {str(e).splitlines()[0]}") from None
    speed_up(pm, m.dropout)
    pm.train(was_training)  # peft's new dropout modules start in training mode whatever the model's mode
    if m.init in _MOVES_BASE:
        # peft's documented recipe: save the initial adapter as a plain LoRA, for conversion at save time.
        init_dir = Path(work_dir) / "initial_adapter"
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(str(init_dir))
        pm.peft_config["default"].init_lora_weights = _INIT[m.init]
        pm._lorascope_init_dir = str(init_dir)
    return pm


def _check_lora(model, m: MethodConfig, work_dir: Path | None) -> None:
    """Refuse, naming the field, what peft would build wrongly or silently drop."""
    known = _linear_leaf_names(model)
    missing = [t for t in m.target_modules if t not in known]
    if missing:
        raise ConfigError(
            f"method.targets: module '{missing[0]}' not found in the model (linear modules: {', '.join(sorted(known))})"
        )
    if m.init in _MOVES_BASE and (m.use_dora or m.train_embed_tokens or m.train_lm_head):
        # peft's PiSSA/OLoRA -> LoRA conversion at save time keeps only lora_A/lora_B: a DoRA magnitude or a
        # trained embedding would be dropped from the checkpoint without a word.
        field = "use_dora" if m.use_dora else ("train_embed_tokens" if m.train_embed_tokens else "train_lm_head")
        raise ConfigError(
            f"method.{field}: cannot be combined with method.init={m.init} (peft's conversion of "
            f"{m.init} checkpoints to a plain adapter keeps only the LoRA matrices)"
        )
    if m.init in _MOVES_BASE and work_dir is None:
        raise LorascopeError(f"method.init={m.init} needs a work_dir to keep the initial adapter")


def _modules_to_save(model, m: MethodConfig) -> tuple[list[str], bool]:
    """(peft modules_to_save, ensure_weight_tying) for train_embed_tokens / train_lm_head (see module docstring)."""
    if not (m.train_embed_tokens or m.train_lm_head):
        return [], False
    if is_tied(model):
        modules, tie = ["embed_tokens"], True
    else:
        modules, tie = (
            (["embed_tokens"] if m.train_embed_tokens else []) + (["lm_head"] if m.train_lm_head else []),
            False,
        )
    n = sum(p.numel() for name, p in model.named_parameters() if any(name.endswith(f"{s}.weight") for s in modules))
    # peft writes a tied matrix under both names (safetensors cannot alias), so it costs twice on disk.
    log.warning(
        "training %s adds %.1f MB (fp32) to every adapter checkpoint%s",
        "+".join(modules),
        n * 4 * (2 if tie else 1) / 2**20,
        " (tied with lm_head: one shared matrix, stored under both names)" if tie else "",
    )
    return modules, tie


def _loftq_fields(m: MethodConfig) -> dict:
    """LoraConfig fields for init=loftq ({} otherwise); refused with the reason where it cannot run."""
    if m.init != "loftq":
        return {}
    # peft 0.21's loftq_init quantises with bitsandbytes' NF4 kernels on a hard-coded "cuda" device (its pure
    # torch quantiser was removed in peft 0.20), so there is no CPU path.
    from peft.import_utils import is_bnb_4bit_available

    if not torch.cuda.is_available():
        raise LorascopeError(
            "method.init: loftq needs a CUDA GPU (peft quantises with bitsandbytes 4-bit "
            "on CUDA); this machine has none. Use pissa/olora/gaussian here."
        )
    if not is_bnb_4bit_available():
        raise LorascopeError(
            "method.init: loftq needs bitsandbytes (pip install 'lorascope[gpu]'); peft's LoftQ quantises with it"
        )
    try:
        from peft import LoftQConfig
    except ImportError as e:  # pragma: no cover - depends on peft build
        raise LorascopeError(f"method.init: loftq unavailable in this peft ({e})") from None
    return {"loftq_config": LoftQConfig(loftq_bits=m.loftq_bits)}


def adapted_matrix_names(model) -> list[str]:
    """Names (plain base-model namespace, e.g. 'model.layers.0.self_attn.q_proj.weight') of the matrices a
    method trains: LoRA-wrapped linears and modules_to_save for a PeftModel; every 2-D weight otherwise."""
    model = _plain(model)
    if not hasattr(model, "peft_config"):
        return [n for n, p in model.named_parameters() if p.ndim == 2]
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    prefix = "base_model.model."
    names = [
        n.removeprefix(prefix) + ".weight"
        for n, mod in model.named_modules()
        if isinstance(mod, (LoraLayer, ModulesToSaveWrapper))
    ]
    return sorted(set(names))


def param_groups(model, m: MethodConfig, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups with their own lr: LoRA+ (B at lr*ratio), trained embeddings (embedding_lr), no decay
    on vectors (norms, biases, DoRA magnitudes)."""
    groups: dict[str, dict] = {}

    def add(key: str, p, g_lr: float, wd: float) -> None:
        groups.setdefault(key, {"params": [], "lr": g_lr, "weight_decay": wd, "name": key})["params"].append(p)

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim >= 2 else 0.0
        if m.kind == "lora" and ("modules_to_save" in name or "embed_tokens" in name or "lm_head" in name):
            add("embedding", p, m.embedding_lr or lr, decay)
        elif m.kind == "lora" and m.loraplus_lr_ratio and ("lora_B" in name or "lora_magnitude" in name):
            add("lora_B" if p.ndim >= 2 else "lora_B_vec", p, lr * m.loraplus_lr_ratio, decay)
        else:
            add("decay" if decay else "no_decay", p, lr, decay)
    return list(groups.values())


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def total_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _plain(model):
    """The underlying transformers model (unwrapped from DDP/PeftModel wrappers) for saving full weights."""
    return getattr(model, "module", model)


def save_checkpoint(
    model, m: MethodConfig, path: Path, base_spec: str, meta: dict, tokenizer=None, state_dict: dict | None = None
) -> None:
    """Write HF artifacts then lorascope.json, into a temp dir renamed at the end (never a half checkpoint).
    state_dict: the full weights when `model` holds only shards (FSDP; see lorascope.train.sharded)."""
    model = _plain(model)
    kind, extra = m.kind, {}
    sd = {} if state_dict is None else {"state_dict": state_dict}
    with atomic_dir(Path(path)) as tmp:
        if m.kind == "lora" and m.init == "loftq":
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(str(tmp))
            model.save_pretrained(str(tmp / "adapter"))
            kind, extra = "full", {"adapter_init": "loftq"}
        elif m.kind == "lora":
            init_dir = getattr(model, "_lorascope_init_dir", None)
            model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=init_dir, **sd)
            _name_base(tmp, base_spec)
        else:
            model.save_pretrained(str(tmp), **sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / CKPT_META, {"kind": kind, "base": base_spec, **meta, **extra})


def _name_base(adapter_dir: Path, base_spec: str) -> None:
    """adapter_config.json's base_model_name_or_path: the base as named off this machine (lorascope.json keeps the
    spec lorascope loads it by), not the resolved directory (for a GGUF, a machine-local cache path)."""
    from lorascope.models import portable_base

    f = adapter_dir / "adapter_config.json"
    atomic_write_json(f, {**json.loads(f.read_text()), "base_model_name_or_path": portable_base(base_spec)})


def checkpoint_size_bytes(path: Path) -> int:
    """Bytes of weights on disk (adapter or model), the number users pay per checkpoint."""
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))
