"""Build a dataset and describe it: the backend of a ``lorascope data`` command.

>>> m = data_cli("math-ift", model="embedded", seq_len=512)      # builds (or reads the cache), returns
>>> m["documents"], m["rows"]                                     # the manifest plus packed-row stats
({'train': 8474, 'heldout': 1004}, {'seq_len': 512, 'train': 5009, 'train_fill': 0.7779, ...})
"""

from __future__ import annotations

from ..config import DataConfig, validate


def data_cli(
    dataset: str, model: str = "embedded", regime: str | None = None, max_docs: int | None = None, seq_len: int = 512
) -> dict:
    """Manifest of ``dataset`` for ``model``'s tokenizer, plus how it packs into ``seq_len`` rows."""
    from ..models import load_tokenizer
    from . import dataset_manifest, load_dataset

    dcfg = validate(DataConfig, {"dataset": dataset, "regime": regime, "max_docs": max_docs}, "data")
    tok = load_tokenizer(model)
    m = dataset_manifest(dcfg, tok)
    rows = {"seq_len": seq_len}
    for split in ("train", "heldout"):
        ds = load_dataset(dcfg, tok, seq_len, split)
        rows[split] = len(ds)
        if split == "train" and len(ds):
            used = int(ds.attention_mask.sum())
            rows["train_fill"] = round(used / ds.attention_mask.size, 4)  # share of non-padding positions
            rows["train_supervised"] = round(int((ds.labels != -100).sum()) / used, 4)  # loss-bearing share
    m["rows"] = rows
    return m
