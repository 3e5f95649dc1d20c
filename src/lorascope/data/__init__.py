"""Training data: four built-in datasets standing in for the paper's, and user files.

    ds = load_dataset(DataConfig(dataset="code-cpt"), tokenizer, seq_len=256)     # packed CPT sequences
    ds[0] -> {"input_ids": LongTensor[256], "labels": LongTensor[256], "attention_mask": LongTensor[256]}
    dataset_manifest(DataConfig(dataset="code-cpt"), tokenizer)  # sources, licences, counts, tokens, hash

| name      | stands in for          | source here                                                     |
|-----------|------------------------|-----------------------------------------------------------------|
| code-cpt  | StarCoder-Python       | CPython stdlib + sympy/mpmath/networkx/jinja2 source            |
| math-cpt  | OpenWebMath            | sympy/mpmath/scipy docstrings with formulas                     |
| code-ift  | Magicoder-Evol-Instruct| reasoning-gym CodeI/O: task + I/O spec -> Python solution       |
| math-ift  | MetaMathQA             | MATH test problems outside MATH-500, with worked solutions      |

CPT packs documents (joined by EOS) into full seq_len rows: no padding, loss on every token. IFT renders each
pair with the tokenizer's chat template, masks the prompt (labels -100) so the loss is on the response
(including its end-of-turn token), and packs whole examples greedily into seq_len rows (an example longer than
seq_len is truncated; padding only fills the tail of a row and is masked). Packed examples attend to each other
within a row, as in TRL's default packing; the loss masks keep the objective per-response.

Everything is decontaminated (see decontam.py) and cached under $LORASCOPE_CACHE/data/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..assets import cache_dir
from ..config import DataConfig
from ..errors import LorascopeError
from .corpora import BUILDERS
from .decontam import Decontaminator, decontaminate

BUILTIN = tuple(BUILDERS)
VERSION = 1  # bump when builders change: invalidates caches


def gsm8k_symbolic_ids() -> list[int]:
    """GSM8K test ids that reasoning-gym's gsm_symbolic uses as templates (contaminated if trained on)."""
    return json.loads((Path(__file__).parent.parent / "resources" / "gsm8k_symbolic_ids.json").read_text())


def _as_config(d) -> DataConfig:
    return d if isinstance(d, DataConfig) else DataConfig(dataset=str(d))


def _docs_key(dcfg: DataConfig) -> str:
    src = dcfg.dataset
    if not dcfg.dataset in BUILDERS and not dcfg.dataset.startswith("hf:"):
        p = Path(dcfg.dataset)
        if p.exists():
            st = p.stat()
            src = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    raw = json.dumps([VERSION, src, dcfg.regime, dcfg.text_field, dcfg.prompt_field, dcfg.response_field,
                      dcfg.max_docs])
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def _cache(dcfg: DataConfig) -> Path:
    name = dcfg.dataset if dcfg.dataset in BUILDERS else "user"
    return cache_dir() / "data" / f"{name}-{_docs_key(dcfg)}"


def load_docs(dcfg: DataConfig) -> dict:
    """{"train": [...], "heldout": [...], "sources": [...], "decontamination": {...}} (cached as JSON)."""
    d = _cache(dcfg)
    f = d / "docs.json"
    if f.exists():
        return json.loads(f.read_text())
    if dcfg.dataset in BUILDERS:
        train, heldout, sources = BUILDERS[dcfg.dataset]()
    else:
        from .sources import user_docs

        train, heldout, sources = user_docs(dcfg)
    if dcfg.max_docs:
        train, heldout = train[: dcfg.max_docs], heldout[: max(1, dcfg.max_docs // 10)]
    deco = Decontaminator()
    train, dropped_train = decontaminate(train, deco)
    heldout, dropped_heldout = decontaminate(heldout, deco)
    if not train:
        raise LorascopeError(f"data.dataset: '{dcfg.dataset}' has no training documents left")
    out = {"train": train, "heldout": heldout, "sources": sources,
           "decontamination": {"rule": ">=50% of an eval item's 10-grams", "dropped_train": dropped_train,
                               "dropped_heldout": dropped_heldout}}
    d.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.rename(f)
    return out


def _tok_key(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000]) + str(len(tokenizer))
    tmpl = tokenizer.chat_template or ""
    return hashlib.sha1((vocab + tmpl).encode()).hexdigest()[:10]


def _tokenize(dcfg: DataConfig, tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) flat int32 arrays for the split; documents end with EOS (CPT) / end-of-turn (IFT)."""
    d = _cache(dcfg) / f"tok-{_tok_key(tokenizer)}"
    ft, fl = d / f"{split}.tokens.npy", d / f"{split}.labels.npy"
    if ft.exists() and fl.exists():
        return np.load(ft), np.load(fl)
    docs = load_docs(dcfg)[split]
    eos = tokenizer.eos_token_id
    toks, labs = [], []
    if dcfg.regime == "cpt":
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        for x in ids:
            toks.append(np.asarray(x + [eos], dtype=np.int32))
        labs = toks
    else:
        for ex in docs:
            prompt = [{"role": "user", "content": ex["prompt"]}]
            # render text, then tokenize prompt and response parts separately so the mask boundary is exact
            p_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            full_text = tokenizer.apply_chat_template(
                prompt + [{"role": "assistant", "content": ex["response"]}], tokenize=False)
            if not full_text.startswith(p_text):
                raise LorascopeError("tokenizer chat template: the prompt is not a prefix of prompt+response")
            p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
            full = p_ids + tokenizer(full_text[len(p_text):], add_special_tokens=False)["input_ids"]
            t = np.asarray(full, dtype=np.int32)
            lab = t.copy()
            lab[: len(p_ids)] = -100
            toks.append(t)
            labs.append(lab)
    tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    labels = np.concatenate(labs) if labs else np.zeros(0, np.int32)
    # keep example boundaries for IFT packing: store lengths alongside
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / f"{split}.lengths.npy", np.asarray([len(t) for t in toks], dtype=np.int64))
    np.save(fl, labels)
    np.save(ft, tokens)
    return tokens, labels


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length rows of input_ids / labels / attention_mask."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray):
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.from_numpy(self.input_ids[i].astype(np.int64)),
                "labels": torch.from_numpy(self.labels[i].astype(np.int64)),
                "attention_mask": torch.from_numpy(self.attention_mask[i].astype(np.int64))}


def pack_stream(tokens: np.ndarray, seq_len: int) -> PackedDataset:
    n = len(tokens) // seq_len
    rows = tokens[: n * seq_len].reshape(n, seq_len)
    return PackedDataset(rows, rows, np.ones_like(rows))


def pack_examples(tokens: np.ndarray, labels: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int) -> PackedDataset:
    """Greedy first-fit-in-order packing of whole examples; the unused tail is padding with labels -100."""
    rows_t, rows_l, rows_m = [], [], []
    cur_t, cur_l = [], []
    off = 0

    def flush():
        if cur_t:
            t = np.concatenate(cur_t)
            l = np.concatenate(cur_l)
            pad = seq_len - len(t)
            rows_t.append(np.pad(t, (0, pad), constant_values=pad_id))
            rows_l.append(np.pad(l, (0, pad), constant_values=-100))
            rows_m.append(np.pad(np.ones(len(t), np.int32), (0, pad)))

    for n in lengths:
        t, l = tokens[off: off + n][:seq_len], labels[off: off + n][:seq_len]
        off += n
        if sum(len(x) for x in cur_t) + len(t) > seq_len:
            flush()
            cur_t, cur_l = [], []
        cur_t.append(t)
        cur_l.append(l)
    flush()
    if not rows_t:
        return PackedDataset(np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32),
                             np.zeros((0, seq_len), np.int32))
    return PackedDataset(np.stack(rows_t), np.stack(rows_l), np.stack(rows_m))


def load_dataset(dcfg: DataConfig, tokenizer, seq_len: int, split: str = "train") -> PackedDataset:
    if split not in ("train", "heldout"):
        raise LorascopeError(f"split must be 'train' or 'heldout' (got {split!r})")
    tokens, labels = _tokenize(dcfg, tokenizer, split)
    if dcfg.regime == "cpt":
        ds = pack_stream(tokens, seq_len)
    else:
        lengths = np.load(_cache(dcfg) / f"tok-{_tok_key(tokenizer)}" / f"{split}.lengths.npy")
        ds = pack_examples(tokens, labels, lengths, seq_len, tokenizer.pad_token_id or 0)
    if split == "train" and len(ds) == 0:
        raise LorascopeError(f"data.dataset: '{dcfg.dataset}' gives no training sequence of seq_len={seq_len}")
    return ds


def heldout_texts(dcfg_or_name, limit: int | None = None) -> list[str]:
    """Raw held-out documents (CPT text, or prompt+response for IFT) for bits-per-byte evaluation."""
    docs = load_docs(_as_config(dcfg_or_name))["heldout"]
    texts = [d if isinstance(d, str) else d["prompt"] + "\n" + d["response"] for d in docs]
    return texts[:limit] if limit else texts


def dataset_manifest(dcfg: DataConfig, tokenizer) -> dict:
    docs = load_docs(dcfg)
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        for d in docs[split]:
            h.update(json.dumps(d, sort_keys=True).encode())
    tokens = {s: int(len(_tokenize(dcfg, tokenizer, s)[0])) for s in ("train", "heldout")}
    return {"name": dcfg.dataset, "regime": dcfg.regime, "builder_version": VERSION, "sources": docs["sources"],
            "documents": {s: len(docs[s]) for s in ("train", "heldout")}, "tokens": tokens,
            "content_hash": h.hexdigest(), "decontamination": docs["decontamination"],
            # built-ins do not use reasoning-gym's gsm_symbolic, so no GSM8K test item is a training template
            "excluded_eval_ids": {}}
