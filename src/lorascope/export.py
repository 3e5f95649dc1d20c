"""Export a run's checkpoint as an artifact that travels: an HF model directory (a PEFT adapter, or with
``merged`` the whole model) loadable by ``from_pretrained``, and a model card (README.md) that says what was
trained, from what, on what data, and what its study concluded::

    lorascope export runs/r64:tok-000000004096 --out exported/r64 [--merged]

No file written names a path of this machine: the base model is named by hub id, or GGUF file name + sha256, or
directory name (models.portable_base); paths in the config and data manifest are reduced to file names; and the
directory is checked for the run's, the base model's and the cache's paths before it is handed over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from lorascope.errors import LorascopeError
from lorascope.fileio import atomic_dir, atomic_write_json, atomic_write_text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(spec: str, out: Path, merged: bool = False) -> Path:
    """Write RUN[:CHECKPOINT] into ``out`` (refused if it exists) and return ``out``."""
    from lorascope.models import find_checkpoint, is_run_dir, load_checkpoint, load_tokenizer, split_spec

    run, name = split_spec(spec)
    if not is_run_dir(run):
        raise LorascopeError(f"{spec}: not a run directory (RUN[:CHECKPOINT])")
    ck, out = find_checkpoint(run, name), Path(out)
    if out.exists():
        raise LorascopeError(f"{out}: already exists; export into a new directory")
    with atomic_dir(out) as tmp:
        if ck.kind == "lora" and not merged:
            for f in ADAPTER_FILES:
                shutil.copyfile(ck.path / f, tmp / f)
        else:
            model, _ = load_checkpoint(ck, merge=True)
            model.save_pretrained(str(tmp))
        load_tokenizer(ck.base).save_pretrained(str(tmp))
        _scrub_configs(tmp, ck.base)
        atomic_write_text(tmp / "README.md", model_card(Path(run), ck, merged or ck.kind == "full"))
        _check_portable(tmp, [Path(run), ck.path, *_local_roots(ck.base)])
    return out


def _local_roots(base: str) -> list[Path]:
    from lorascope.assets import cache_dir
    from lorascope.models import resolve_base

    # not the home directory itself: a short path such as /root can be a token of a tokenizer's vocabulary
    return [cache_dir(), Path(resolve_base(base))]


def _scrub_configs(d: Path, base: str) -> None:
    """The base's name in adapter_config.json and the configs' name_or_path fields, off this machine's paths."""
    from lorascope.models import portable_base

    for f in ("adapter_config.json", "config.json", "tokenizer_config.json", "generation_config.json"):
        p = d / f
        if p.exists():
            cfg = json.loads(p.read_text())
            for k in ("base_model_name_or_path", "_name_or_path", "name_or_path"):
                if k in cfg:
                    cfg[k] = portable_base(base)
            atomic_write_json(p, cfg)


def _check_portable(d: Path, roots: list[Path]) -> None:
    """Refuse to hand over a directory whose files name one of ``roots`` (machine-local paths)."""
    needles = {str(r.resolve()) for r in roots} | {str(r) for r in roots}
    needles = {n.encode() for n in needles if len(n) > 1}
    for f in d.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hit = next((n for n in needles if n in data), None)
            if hit:
                raise LorascopeError(f"{f.name}: names a machine-local path ({hit.decode()}); not exported")


def portable(obj):
    """Paths inside a config or manifest reduced to file names ('/data/x/code.jsonl' -> 'code.jsonl')."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str) and ("/" in obj or "\\" in obj) and (Path(obj).is_absolute() or Path(obj).exists()):
        return Path(obj).name
    return obj


# ---------------------------------------------------------------------------------------------------------
# the model card


def base_line(base: str) -> str:
    """How the card names the base: hub id, or GGUF file name + sha256, or the directory's name."""
    from lorascope.assets import embedded_gguf

    gguf = embedded_gguf() if base == "embedded" else Path(base) if base.endswith(".gguf") else None
    if gguf is not None:
        return f"GGUF file `{gguf.name}`, sha256 `{_sha256(gguf)}`"
    if Path(base).exists():
        return f"a local model directory `{Path(base).name}` (not on a model hub)"
    return f"[{base}](https://huggingface.co/{base})"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_card(run: Path, ck, merged: bool) -> str:
    """README.md: what the directory holds, its base, training config, data and, in a study, the conclusions."""
    from lorascope.models import portable_base

    cfg = portable(yaml.safe_load((run / "config.yaml").read_text()))
    meta = json.loads((ck.path / "lorascope.json").read_text())
    what = "the merged model" if merged and ck.kind == "lora" else "the fully fine-tuned model" if merged else None
    what = what or "a LoRA adapter (load it onto the base with PEFT)"
    front = {"library_name": "transformers" if merged else "peft", "tags": ["lorascope", cfg["method"]["kind"]]}
    if "/" in portable_base(ck.base) and not Path(ck.base).exists():
        front["base_model"] = ck.base
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {run.name}: checkpoint {ck.path.name}",
        "",
        f"This directory holds {what}, trained with lorascope.",
        "",
        f"- Base model: {base_line(ck.base)}",
        f"- Checkpoint: step {meta.get('step')}, {meta.get('tokens')} tokens trained, "
        f"final LR {meta.get('final_lr') or 0:.3g}",
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).strip(),
        "```",
        *_data_section(run),
        *_study_section(run),
    ]
    return "\n".join(lines) + "\n"


def _data_section(run: Path) -> list[str]:
    f = run / "data_manifest.json"
    if not f.exists():
        return []
    m = portable(json.loads(f.read_text()))
    keep = ("name", "regime", "sources", "documents", "tokens", "content_hash", "decontamination")
    summary = {k: m[k] for k in keep if k in m}
    return ["", "## Training data", "", "```yaml", yaml.safe_dump(summary, sort_keys=False).strip(), "```"]


def _study_section(run: Path) -> list[str]:
    """The study's verdicts and recommendation, when the run is STUDY/runs/<id> and the study was reported."""
    from lorascope.train.tracking import study_conclusions

    study = run.parent.parent
    if run.parent.name != "runs" or not (study / "study.yaml").exists():
        return []
    found = study_conclusions(study)
    if not found:
        return ["", "## Study", "", "This run belongs to a study that has not been reported yet."]
    rows = [f"- {k}: {v}" for k, v in found.items() if k.startswith(("recommendation/", "verdict/"))]
    return ["", "## Study", "", f"From the report of study `{study.name}`:", "", *rows]
