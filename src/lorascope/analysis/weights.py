"""The adapted matrices of a run checkpoint, as (W_base, W_tuned) pairs.

dW is always ``merged tuned weights - ORIGINAL base weights``: never ``B @ A``. Methods that move the base
(PiSSA, OLoRA), rescale it (DoRA's magnitude vector) or train embeddings are therefore measured correctly
without knowing anything about them.

Example::

    from lorascope.analysis.weights import load_pair, iter_matrices

    pair = load_pair("runs/lora-r16:tok-000008192")      # base + merged tuned model, in memory
    for m in iter_matrices(pair.base, pair.tuned):
        print(m.name, m.layer, m.module, tuple(m.w_base.shape), float((m.delta).norm()))
    # model.layers.0.self_attn.q_proj 0 q_proj (576, 576) 0.0213
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LorascopeError
from ..models import CKPT_META, Checkpoint, find_checkpoint, is_run_dir, load_base, load_checkpoint, split_spec

_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class Matrix:
    """One weight matrix of the model: where it sits and its base/tuned values (fp32, [out, in])."""

    name: str  # module name, e.g. model.layers.3.mlp.gate_proj
    layer: int | None  # block index; None for embed_tokens / lm_head
    module: str  # module type: q_proj, gate_proj, embed_tokens, ...
    w_base: torch.Tensor
    w_tuned: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        return self.w_tuned - self.w_base

    @property
    def changed(self) -> bool:
        return not torch.equal(self.w_base, self.w_tuned)


@dataclass
class RunPair:
    """A checkpoint with its base and its (merged) tuned model loaded."""

    checkpoint: Checkpoint
    meta: dict  # the checkpoint's lorascope.json
    base: torch.nn.Module
    tuned: torch.nn.Module
    tokenizer: object
    run_dir: Path = field(default_factory=Path)


def _check_metas(run_dir: Path) -> None:
    """Fail with one clear line on a checkpoint whose metadata is unreadable or has no base reference.

    models.Checkpoint.read would raise a bare KeyError on a missing field, so we validate first.
    """
    for meta_file in sorted((run_dir / "checkpoints").glob(f"*/{CKPT_META}")):
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise LorascopeError(f"{meta_file}: unreadable checkpoint metadata ({e})") from None
        if not isinstance(meta, dict) or not meta.get("base"):
            raise LorascopeError(f"{meta_file}: no 'base' model reference; cannot compute dW = tuned - base")
        if meta.get("kind") not in ("lora", "full"):
            raise LorascopeError(f"{meta_file}: 'kind' must be 'lora' or 'full' (got {meta.get('kind')!r})")


def resolve_checkpoint(run: str) -> tuple[Path, Checkpoint, dict]:
    """'RUN[:CHECKPOINT]' -> (run dir, checkpoint, its metadata); LorascopeError on anything missing."""
    path, ck_name = split_spec(run)
    if not is_run_dir(path):
        raise LorascopeError(f"'{run}' is not a run directory (no checkpoints/ inside)")
    run_dir = Path(path)
    _check_metas(run_dir)
    ck = find_checkpoint(run_dir, ck_name)
    meta = json.loads((ck.path / CKPT_META).read_text())
    return run_dir, ck, meta


def load_pair(run: str) -> RunPair:
    """Load the ORIGINAL base and the merged tuned model of 'RUN[:CHECKPOINT]' (fp32, eval mode)."""
    run_dir, ck, meta = resolve_checkpoint(run)
    base, tok = load_base(ck.base)
    tuned, _ = load_checkpoint(ck, merge=True)
    return RunPair(checkpoint=ck, meta=meta, base=base, tuned=tuned, tokenizer=tok, run_dir=run_dir)


def _module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def iter_matrices(base: torch.nn.Module, tuned: torch.nn.Module, only_changed: bool = False) -> Iterator[Matrix]:
    """Every Linear inside a numbered block (always), plus embeddings / lm_head when they changed.

    A tied lm_head is skipped (it IS embed_tokens). Matrices are yielded in module order; weights are
    detached fp32 views of the models' own parameters (no copies).
    """
    tuned_emb = tuned.get_input_embeddings()
    emb_ptr = tuned_emb.weight.data_ptr() if tuned_emb is not None else None
    for name, mod in tuned.named_modules():
        is_lin = isinstance(mod, torch.nn.Linear)
        if not (is_lin or isinstance(mod, torch.nn.Embedding)):
            continue
        if is_lin and mod.weight.data_ptr() == emb_ptr:
            continue  # tied output head: same tensor as the input embedding
        try:
            bmod = base.get_submodule(name)
        except AttributeError:
            raise LorascopeError(f"module '{name}' of the tuned model is missing from the base model") from None
        wb, wt = bmod.weight.detach().float(), mod.weight.detach().float()
        if wb.shape != wt.shape:
            raise LorascopeError(f"{name}: base shape {tuple(wb.shape)} != tuned shape {tuple(wt.shape)}")
        lm = _LAYER_RE.search(name + ".")
        layer = int(lm.group(1)) if lm else None
        m = Matrix(name=name, layer=layer, module=_module_type(name), w_base=wb, w_tuned=wt)
        # Block linears are always reported (a zero dW is information: an untargeted module);
        # embeddings and heads only when training touched them.
        if (layer is None or not is_lin) and not m.changed:
            continue
        if only_changed and not m.changed:
            continue
        yield m


def set_weight(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Overwrite a module's weight in place (keeps tying: a tied head follows its embedding)."""
    w = model.get_submodule(name).weight
    with torch.no_grad():
        w.copy_(value.to(w.dtype))


def save_hf_model(model: torch.nn.Module, tokenizer, out: Path, extra: dict[str, dict] | None = None) -> Path:
    """Save a standard HF model dir atomically: written under a temp name, renamed when complete."""
    from ..fileio import atomic_dir

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for fname, obj in (extra or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=1) + "\n")
    return out
