"""Decontamination: drop training documents that contain an evaluation item.

Rule (after the n-gram overlap checks of the GPT-3 / Llama-2 reports, made item-centric): a training document
is dropped when it covers >= 50% of the whitespace 10-grams of any evaluation item (items shorter than 10
words use their whole word sequence as one n-gram). Items: HumanEval prompt+canonical solution, MBPP
text+code, GSM8K question+answer, MATH-500 problem+solution.

    keep, dropped = decontaminate(docs)      # dropped: {"humaneval": 3, ...}
"""

from __future__ import annotations

from collections import defaultdict

N = 10
THRESHOLD = 0.5


def _grams(text: str) -> set[int]:
    w = text.split()
    if len(w) < N:
        return {hash(tuple(w))} if w else set()
    return {hash(tuple(w[i:i + N])) for i in range(len(w) - N + 1)}


def eval_items() -> dict[str, list[str]]:
    from ..evals import sources as s

    return {
        "humaneval": [x["prompt"] + x["canonical_solution"] for x in s.humaneval()],
        "mbpp": [x["text"] + "\n" + x["code"] for x in s.mbpp()],
        "gsm8k": [x["question"] + "\n" + x["answer"] for x in s.gsm8k()],
        "math500": [x["problem"] + "\n" + x["solution"] for x in s.math500()],
    }


class Decontaminator:
    def __init__(self, items: dict[str, list[str]] | None = None):
        items = eval_items() if items is None else items
        self.index: dict[int, list[tuple[str, int]]] = defaultdict(list)
        self.sizes: dict[tuple[str, int], int] = {}
        for task, texts in items.items():
            for i, t in enumerate(texts):
                g = _grams(t)
                self.sizes[(task, i)] = len(g)
                for h in g:
                    self.index[h].append((task, i))

    def hit(self, text: str) -> str | None:
        """The eval set a document contaminates, or None."""
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for h in _grams(text):
            for key in self.index.get(h, ()):
                counts[key] += 1
        for key, c in counts.items():
            if c >= THRESHOLD * self.sizes[key]:
                return key[0]
        return None


def decontaminate(docs: list, deco: Decontaminator) -> tuple[list, dict[str, int]]:
    keep, dropped = [], defaultdict(int)
    for d in docs:
        text = d if isinstance(d, str) else d["prompt"] + "\n" + d["response"]
        task = deco.hit(text)
        if task is None:
            keep.append(d)
        else:
            dropped[task] += 1
    return keep, dict(dropped)
