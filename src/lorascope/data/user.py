"""User data: local .jsonl / .parquet / .txt files, or ``hf:<hub id>`` through the datasets library.

CPT records need ``data.text_field``; IFT records need ``data.prompt_field`` + ``data.response_field``, or a
``messages`` list in chat format ([{"role", "content"}, ...], the last turn being the assistant's response).
A .txt file is one CPT document. About 10% of records (by a stable content hash) are held out, each its own
item cluster; with ``data.group_field`` (e.g. "repo") a tenth of the groups are held out whole (those with the
lowest hashes of their values), and a group is one cluster, on one side of the validation/test split.

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
from ..splits import cluster_key

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


def _hash(key) -> int:
    return int(hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest(), 16)


def _group(r: dict, field: str, where: str) -> str:
    v = r.get(field)
    if v is None or str(v).strip() == "":
        raise LorascopeError(f"data.group_field: {where} has no field '{field}' (or it is empty)")
    return str(v)


def _records_held(docs: list) -> list[bool]:
    """Per record: held out when its content hash falls in the held-out tenth (none of fewer than 10 records:
    a held-out split of 0-1 documents measures nothing)."""
    return [len(docs) >= 10 and _hash(d) % 10 == 0 for d in docs]


def _groups_held(groups: list[str]) -> list[bool]:
    """Per record: held out when its group is among the tenth of groups (rounded up) with the lowest hashes, so
    a dozen repositories still hold one out; none of fewer than 10 groups."""
    units = sorted(set(groups), key=_hash)
    held = set(units[: -(-len(units) // 10)]) if len(units) >= 10 else set()
    return [g in held for g in groups]


def user_docs(dcfg: DataConfig) -> tuple[list, list, list, list]:
    """(train, heldout, sources, heldout groups) of a user dataset: records are held out one by one (groups
    are None), or whole groups of data.group_field (groups are its values); empty documents are skipped, an
    empty dataset is an error."""
    docs, keys = [], []
    for i, r in enumerate(records(dcfg)):
        where = f"{dcfg.dataset}: record {i + 1}"
        doc = _doc(r, dcfg, where)
        group = _group(r, dcfg.group_field, where) if dcfg.group_field else None
        if (doc if isinstance(doc, str) else doc["response"]).strip():
            docs.append(doc)
            keys.append(group)
    if not docs:
        raise LorascopeError(f"data.dataset: '{dcfg.dataset}' is empty (no non-empty documents)")
    held = _groups_held(keys) if dcfg.group_field else _records_held(docs)
    groups = [cluster_key(g) if g is not None else None for g, h in zip(keys, held) if h]
    train = [d for d, h in zip(docs, held) if not h]
    heldout = [d for d, h in zip(docs, held) if h]
    sources = [{"name": dcfg.dataset, "licence": "user data", "documents": len(docs)}]
    return train, heldout, sources, groups
