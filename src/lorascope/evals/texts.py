"""The text pools scored as whole texts (not as benchmark items): English prose and held-out training documents.

- ``english_texts()``: general English prose for ``english_bpb`` and ``kl_base``.
- ``heldout_windows(dataset, limit)``: pieces of a training dataset's held-out documents for ``heldout_bpb``.

Example::

    >>> english_texts(limit=2)[0].keys()
    dict_keys(['id', 'text'])
"""

from __future__ import annotations

from .. import benchdata
from ..errors import LorascopeError
from .multiple_choice import hellaswag_preprocess

HELDOUT_CHARS = 1500  # ~410 tokens of Python on average: one window, no overlap cost


def english_texts(limit: int | None = None) -> list[dict]:
    """[{id, text}] of general English prose (HellaSwag validation context + gold ending, from the end)."""
    docs = benchdata.hellaswag()[::-1]
    docs = docs[:limit] if limit is not None else docs
    out = []
    for d in docs:
        text = d["ctx_a"] + " " + d["ctx_b"].capitalize() + " " + d["endings"][d["label"]]
        out.append({"id": d["id"], "text": hellaswag_preprocess(text)})
    return out


def heldout_windows(dataset: str, limit: int | None = None) -> list[dict]:
    """Held-out documents are whole source files of very different lengths (up to 150 kB), so each contributes
    its first HELDOUT_CHARS characters (cut at a line end): the cost per item is bounded and long files do not
    dominate; with a limit, items are spread evenly over the split (which is ordered by package)."""
    from ..data import heldout_texts

    texts = heldout_texts(dataset)
    if not texts:
        raise LorascopeError(f"dataset '{dataset}' has no held-out documents")
    idx = list(range(len(texts)))
    if limit and limit < len(texts):
        idx = sorted({round(i * (len(texts) - 1) / max(1, limit - 1)) for i in range(limit)})
    out = []
    for i in idx:
        t = texts[i]
        if not t:  # no bytes to normalise by
            continue
        if len(t) > HELDOUT_CHARS:
            cut = t.rfind("\n", 0, HELDOUT_CHARS)
            t = t[: cut if cut > HELDOUT_CHARS // 2 else HELDOUT_CHARS]
        out.append({"id": i, "text": t})
    return out
