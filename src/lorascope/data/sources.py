"""User data: local .jsonl / .parquet / .txt files, or ``hf:<hub id>`` through the datasets library.

CPT records need ``text_field``; IFT records need ``prompt_field`` + ``response_field`` or a ``messages`` list
(chat format, the last assistant turn is the response).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import DataConfig
from ..errors import LorascopeError


def _records(dcfg: DataConfig) -> list[dict]:
    spec = dcfg.dataset
    if spec.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise LorascopeError("data.dataset: hub datasets need the datasets package (pip install datasets)") from None
        return list(datasets.load_dataset(spec[3:], split="train"))
    p = Path(spec)
    if not p.exists():
        raise LorascopeError(f"data.dataset: file '{spec}' does not exist "
                             f"(built-in datasets: code-cpt, math-cpt, code-ift, math-ift)")
    if p.suffix == ".txt":
        return [{dcfg.text_field: p.read_text(encoding="utf-8", errors="replace")}]
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LorascopeError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        return rows
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise LorascopeError(f"{p}: unreadable parquet ({e})") from None
    raise LorascopeError(f"data.dataset: '{spec}' must end in .jsonl, .parquet or .txt (or be hf:<id>)")


def user_docs(dcfg: DataConfig) -> tuple[list, list, list]:
    rows = _records(dcfg)
    docs = []
    for i, r in enumerate(rows):
        if dcfg.regime == "cpt":
            if dcfg.text_field not in r:
                raise LorascopeError(f"{dcfg.dataset}: record {i} has no field '{dcfg.text_field}' (data.text_field)")
            docs.append(str(r[dcfg.text_field]))
        elif "messages" in r and dcfg.prompt_field not in r:
            msgs = r["messages"]
            docs.append({"prompt": "\n".join(m["content"] for m in msgs[:-1]), "response": msgs[-1]["content"]})
        else:
            for f, name in ((dcfg.prompt_field, "prompt_field"), (dcfg.response_field, "response_field")):
                if f not in r:
                    raise LorascopeError(f"{dcfg.dataset}: record {i} has no field '{f}' (data.{name})")
            docs.append({"prompt": str(r[dcfg.prompt_field]), "response": str(r[dcfg.response_field])})
    docs = [d for d in docs if (d if isinstance(d, str) else d["response"]).strip()]
    if not docs:
        raise LorascopeError(f"data.dataset: '{dcfg.dataset}' is empty")
    # hold out ~10% of records by content hash (stable under reordering); a single record is all training
    key = lambda d: int(hashlib.sha1(json.dumps(d).encode()).hexdigest(), 16) % 10 == 0
    heldout = [d for d in docs if key(d)] if len(docs) >= 10 else []
    train = [d for d in docs if not (len(docs) >= 10 and key(d))]
    return train, heldout, [{"name": dcfg.dataset, "licence": "user data"}]
