"""User data: local .jsonl / .parquet / .txt files, or ``hf:<hub id>`` through the datasets library.

CPT records need ``data.text_field``; IFT records need ``data.prompt_field`` + ``data.response_field``, or a
``messages`` list in chat format ([{"role", "content"}, ...], the last turn being the assistant's response).
A .txt file is one CPT document. About 10% of records (by a stable content hash) are held out.

    train, heldout, sources, groups = user_docs(DataConfig(dataset="notes.jsonl", text_field="body"))
    train, heldout, sources, groups = user_docs(DataConfig(dataset="hf:openai/gsm8k", regime="ift",
                                                   prompt_field="question", response_field="answer"))
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import DataConfig
from ..errors import LorascopeError

SUFFIXES = (".jsonl", ".parquet", ".txt")


def _hub_records(spec: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise LorascopeError(f"data.dataset: '{spec}' needs the datasets package (pip install datasets)") from None
    name, _, split = spec[3:].partition(":")  # hf:<id>[:<split>]
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as e:  # hub/network/format errors come in many types
        raise LorascopeError(f"data.dataset: cannot load '{spec}' ({type(e).__name__}: {e})") from None


def records(dcfg: DataConfig) -> list[dict]:
    """Raw records of a user dataset; clear errors for a missing, unreadable or unsupported file."""
    spec = dcfg.dataset
    if spec.startswith("hf:"):
        return _hub_records(spec)
    p = Path(spec)
    if not p.is_file():
        raise LorascopeError(
            f"data.dataset: file '{spec}' does not exist (built-in datasets: code-cpt, math-cpt, code-ift, math-ift)"
        )
    if p.suffix not in SUFFIXES:
        raise LorascopeError(f"data.dataset: '{spec}' must end in .jsonl, .parquet or .txt (or be hf:<id>)")
    if p.suffix == ".txt":
        return [{dcfg.text_field: p.read_text(encoding="utf-8", errors="replace")}]
    if p.suffix == ".jsonl":
        rows = []
        with p.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise LorascopeError(f"{p}: line {i} is not valid JSON ({e.msg})") from None
                    if not isinstance(rows[-1], dict):
                        raise LorascopeError(f"{p}: line {i} is not a JSON object")
        return rows
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise LorascopeError(f"{p}: unreadable parquet ({e})") from None


def _chat_pair(msgs, where: str) -> dict:
    ok = (
        isinstance(msgs, list)
        and len(msgs) >= 2
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs)
    )
    if not ok or msgs[-1]["role"] != "assistant":
        raise LorascopeError(
            f"{where}: 'messages' must be a list of {{role, content}} turns ending with an assistant turn"
        )
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]],
        "response": msgs[-1]["content"],
    }


def _doc(r: dict, dcfg: DataConfig, where: str):
    if dcfg.regime == "cpt":
        if dcfg.text_field not in r:
            raise LorascopeError(f"{where} has no field '{dcfg.text_field}' (set data.text_field)")
        return str(r[dcfg.text_field])
    if dcfg.prompt_field not in r and "messages" in r:
        return _chat_pair(r["messages"], where)
    for f, name in ((dcfg.prompt_field, "prompt_field"), (dcfg.response_field, "response_field")):
        if f not in r:
            raise LorascopeError(f"{where} has no field '{f}' (set data.{name}, or give a 'messages' list)")
    return {"prompt": str(r[dcfg.prompt_field]), "response": str(r[dcfg.response_field])}


def _is_heldout(doc) -> bool:
    return int(hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest(), 16) % 10 == 0


def user_docs(dcfg: DataConfig) -> tuple[list, list, list, list]:
    """(train, heldout, sources, heldout groups) of a user dataset: records are held out one by one (groups
    are None); empty documents are skipped, an empty dataset is an error."""
    docs = [_doc(r, dcfg, f"{dcfg.dataset}: record {i + 1}") for i, r in enumerate(records(dcfg))]
    docs = [d for d in docs if (d if isinstance(d, str) else d["response"]).strip()]
    if not docs:
        raise LorascopeError(f"data.dataset: '{dcfg.dataset}' is empty (no non-empty documents)")
    # fewer than 10 records: all of them train (a held-out split of 0-1 documents measures nothing)
    split = len(docs) >= 10
    heldout = [d for d in docs if split and _is_heldout(d)]
    train = [d for d in docs if not (split and _is_heldout(d))]
    sources = [{"name": dcfg.dataset, "licence": "user data", "documents": len(docs)}]
    return train, heldout, sources, [None] * len(heldout)
