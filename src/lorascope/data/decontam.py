"""Decontamination: drop training documents that contain an evaluation item.

Rule (the n-gram overlap checks of the GPT-3 / Llama-2 reports, made item-centric): a training document is
dropped when it contains >= 50% of the distinct whitespace 10-grams of any evaluation item; an item shorter than
10 words counts as one n-gram of its own length. Items: HumanEval prompt+canonical solution, MBPP text+code,
GSM8K test question+answer, MATH-500 problem+solution (read through lorascope.benchdata, the same readers
the evaluations use, so ids agree).

Written by hand because no maintained library does item-centric n-gram decontamination; a hash index of eval
n-grams keeps it to one pass over each document's n-grams (~1 s per 10 MB of text).

    deco = default_decontaminator()               # indexes every eval item once per process
    keep, stats = decontaminate(docs, deco)       # stats: {"dropped": {"humaneval": 3}, "items_hit": {...}}
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

from .. import benchdata

N = 10
THRESHOLD = 0.5


def _ngrams(words: list[str], n: int) -> set[int]:
    # Python's str hash is salted per process: fine, both sides are hashed in the same process
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def eval_items() -> dict[str, list[tuple[object, str]]]:
    """eval set -> [(item id, text)] for every item the project evaluates on."""
    return {
        "humaneval": [(x["id"], x["prompt"] + x["canonical_solution"]) for x in benchdata.humaneval()],
        "mbpp": [(x["id"], x["text"] + "\n" + x["code"]) for x in benchdata.mbpp()],
        "gsm8k": [(x["id"], x["question"] + "\n" + x["answer"]) for x in benchdata.gsm8k()],
        "math500": [(x["id"], x["problem"] + "\n" + x["solution"]) for x in benchdata.math500()],
    }


class Decontaminator:
    """Hash index of eval-item n-grams; ``hit(text)`` names the eval item a document contaminates."""

    def __init__(self, items: dict[str, list[tuple[object, str]]] | None = None):
        items = eval_items() if items is None else items
        self.index: dict[int, list[int]] = defaultdict(list)
        self.keys: list[tuple[str, object]] = []
        self.need: list[float] = []
        self.lengths: set[int] = set()  # n-gram sizes to take from documents: N, plus short items' lengths
        for task, pairs in items.items():
            for item_id, text in pairs:
                words = text.split()
                if not words:
                    continue
                n = min(N, len(words))
                grams = _ngrams(words, n)
                k = len(self.keys)
                self.keys.append((task, item_id))
                self.need.append(THRESHOLD * len(grams))
                self.lengths.add(n)
                for h in grams:
                    self.index[h].append(k)
        self.tasks = sorted(items)

    def hit(self, text: str) -> tuple[str, object] | None:
        """(eval set, item id) of the first item the document covers >= THRESHOLD of, or None."""
        words = text.split()
        counts: dict[int, int] = defaultdict(int)
        for n in self.lengths:
            for h in _ngrams(words, n):
                for k in self.index.get(h, ()):
                    counts[k] += 1
        for k, c in counts.items():
            if c >= self.need[k]:
                return self.keys[k]
        return None


@lru_cache(maxsize=1)
def default_decontaminator() -> Decontaminator:
    """The index over every eval item, built once per process (~2 s)."""
    return Decontaminator()


def doc_text(doc) -> str:
    """The text of a CPT document (str) or an IFT pair ({"prompt": str | messages, "response"})."""
    if isinstance(doc, str):
        return doc
    p = doc["prompt"]
    if isinstance(p, list):
        p = "\n".join(m["content"] for m in p)
    return p + "\n" + doc["response"]


def decontaminate(docs: list, deco: Decontaminator) -> tuple[list, dict]:
    """(kept documents, stats); see kept_indices."""
    keep, stats = kept_indices(docs, deco)
    return [docs[i] for i in keep], stats


def kept_indices(docs: list, deco: Decontaminator) -> tuple[list[int], dict]:
    """(indices of kept docs in order, {"dropped": {eval set: n docs}, "items_hit": {eval set: n distinct items}})."""
    keep, dropped, items = [], defaultdict(int), defaultdict(set)
    for i, d in enumerate(docs):
        hit = deco.hit(doc_text(d))
        if hit is None:
            keep.append(i)
        else:
            dropped[hit[0]] += 1
            items[hit[0]].add(str(hit[1]))
    return keep, {"dropped": dict(sorted(dropped.items())), "items_hit": {t: len(v) for t, v in sorted(items.items())}}
