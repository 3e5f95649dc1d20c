"""Forgetting benchmarks scored by log-likelihood, with lm-evaluation-harness' default prompt formats.

Formats (lm-eval task yaml/utils; target delimiter " ", few-shot delimiter "\\n\\n"):

- ``hellaswag`` (validation, 10,042): ``preprocess(t)`` = strip, " [title]" -> ". ", drop ``[...]`` brackets,
  "  " -> " ". Context ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, choices
  ``" " + preprocess(ending)``. Metrics acc, acc_norm.
- ``arc_challenge`` / ``arc_easy`` (test, 1,172 / 2,376): context ``"Question: {question}\\nAnswer:"``,
  choices ``" " + text``. Metrics acc, acc_norm.
- ``winogrande`` (winogrande_xl validation, 1,267), partial scoring: with ``i = sentence.index("_")`` the two
  contexts are ``sentence[:i] + option``; the single continuation is ``" " + sentence[i+1:].strip()``.
  Metric acc only.

acc = argmax of the summed log-likelihood; acc_norm = argmax of loglik / len(choice text in characters)
(lm-eval's definition, no leading space counted). stderr = sample std (n-1) / sqrt(n), as lm-eval.

Few-shot (``shots=k``, default 0): lm-eval takes shots from the train split, which is not shipped offline, so
shots come from another split where there is one (ARC test <- ARC validation) and otherwise from the same split
without the item itself (HellaSwag, WinoGrande). Unlike lm-eval, which draws new shots for every item, one
seeded draw serves the whole task (as OLMES' fixed shots do) so the few-shot block is computed once and its KV
cache reused; an item that is itself among the shots gets its own seeded redraw without it.

The paper's forgetting score is ``forgetting_mean`` = mean(hellaswag acc_norm, arc_challenge acc_norm,
winogrande acc) (see :func:`lorascope.evals.results.forgetting_mean`).

Example::

    >>> from lorascope.evals.base import EvalContext
    >>> res = HellaSwag().run(EvalContext(model=model, tokenizer=tok, limit=50))
    >>> res.metrics["acc_norm,none"], res.metrics["acc_norm_stderr,none"]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .. import benchdata
from .base import EvalContext, TaskResult
from .engine import Request, score
from .results import in_split, mean_stderr, select_items


@dataclass
class MCItem:
    id: object
    contexts: list[str]  # one shared context, or one per choice (partial scoring)
    continuations: list[str]  # one per choice, or one shared continuation (partial scoring)
    choices: list[str]  # choice texts used for acc_norm's length normalisation
    gold: int
    fewshot_text: str = ""  # this item rendered as a solved example (context + gold continuation)


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class MultipleChoiceTask:
    name = ""
    split = ""
    metrics = ("acc", "acc_norm")
    fewshot_split: str | None = None  # None: other items of the same split

    def load(self, split: str) -> list[dict]:
        raise NotImplementedError

    def to_item(self, doc: dict) -> MCItem:
        raise NotImplementedError

    def requests(self, item: MCItem, prefix: str) -> list[Request]:
        """Engine requests of one item; ``prefix`` is its few-shot block ("" at 0-shot)."""
        if len(item.contexts) == 1:
            return [Request(prefix + item.contexts[0], item.continuations, shared_prefix=prefix)]
        return [Request(prefix + c, item.continuations, shared_prefix=prefix) for c in item.contexts]

    def _fewshot(self, items: list[MCItem], k: int, seed: int) -> dict:
        """item id -> few-shot block; one shared draw, redrawn for items that are part of it."""
        if k == 0:
            return {it.id: "" for it in items}
        if self.fewshot_split:
            pool = [self.to_item(d) for d in self.load(self.fewshot_split)]
        else:
            pool = [self.to_item(d) for d in self.load(self.split)]
        if len(pool) <= k:
            from ..errors import LorascopeError

            raise LorascopeError(f"{self.name}: shots={k} but only {len(pool)} few-shot candidates exist")
        rng = random.Random(seed)
        shared = rng.sample(pool, k)
        shared_ids = {p.id for p in shared}

        def block(exs: list[MCItem]) -> str:
            return "".join(e.fewshot_text + "\n\n" for e in exs)

        out = {}
        common = block(shared)
        same_split = self.fewshot_split is None
        for it in items:
            if same_split and it.id in shared_ids:
                r = random.Random(f"{seed}:{it.id}")
                out[it.id] = block(r.sample([p for p in pool if p.id != it.id], k))
            else:
                out[it.id] = common
        return out

    def run(self, ctx: EvalContext) -> TaskResult:
        docs = select_items(self.load(self.split), ctx.excluded_ids.get(self.name, []), ctx.limit)
        items = [self.to_item(d) for d in docs]
        k = ctx.shots or 0
        prefixes = self._fewshot(items, k, ctx.seed)  # from every item: a split's prompts as in a full evaluation
        items = [it for it in items if in_split(ctx.split, f"{self.name}/{it.id}")]
        reqs, spans = [], []
        for it in items:
            r = self.requests(it, prefixes[it.id])
            spans.append((len(reqs), len(reqs) + len(r)))
            reqs.extend(r)
        scored = score(ctx.model, ctx.tokenizer, reqs, batch_size=ctx.batch_size, progress=ctx.progress, desc=self.name)
        samples = []
        for it, (a, b) in zip(items, spans):
            flat = [x for r in scored[a:b] for x in r]  # one (ll, greedy) per choice in either layout
            lls = [ll for ll, _ in flat]
            pred = max(range(len(lls)), key=lls.__getitem__)
            normed = [ll / len(c) for ll, c in zip(lls, it.choices)]
            pred_norm = max(range(len(normed)), key=normed.__getitem__)
            samples.append(
                {
                    "id": it.id,
                    "loglikelihoods": lls,
                    "is_greedy": [g for _, g in flat],
                    "choice_chars": [len(c) for c in it.choices],
                    "gold": it.gold,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "acc": float(pred == it.gold),
                    "acc_norm": float(pred_norm == it.gold),
                }
            )
        example = self.requests(items[0], prefixes[items[0].id])[0] if items else None
        info = {
            "n": len(items),
            "shots": k,
            "split": self.split,
            "format": "lm-eval default",
            "fewshot_source": (self.fewshot_split or f"{self.split} (item excluded)") if k else None,
            "example_context": example.context if example else None,
            "example_continuation": example.continuations[0] if example else None,
        }
        return TaskResult(metrics=self.metrics_of(samples), samples=samples, info=info, metrics_of=self.metrics_of)

    def metrics_of(self, samples: list[dict]) -> dict[str, float]:
        """lm-eval's acc / acc_norm (with stderr) from per-item sample records."""
        metrics: dict[str, float] = {}
        for name in self.metrics:
            m, se = mean_stderr([s[name] for s in samples])
            metrics[f"{name},none"] = m
            metrics[f"{name}_stderr,none"] = se
        return metrics


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    split = "validation"

    def load(self, split: str) -> list[dict]:
        return benchdata.hellaswag(split)

    def to_item(self, doc: dict) -> MCItem:
        ctx = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices = [hellaswag_preprocess(e) for e in doc["endings"]]
        gold = int(doc["label"])
        return MCItem(
            doc["id"], [ctx], [" " + c for c in choices], choices, gold, fewshot_text=ctx + " " + choices[gold]
        )


class _Arc(MultipleChoiceTask):
    subset = ""
    split = "test"
    fewshot_split = "validation"

    def load(self, split: str) -> list[dict]:
        return benchdata.arc(self.subset, split)

    def to_item(self, doc: dict) -> MCItem:
        ctx = f"Question: {doc['question']}\nAnswer:"
        choices = list(doc["choices"])
        return MCItem(
            doc["id"],
            [ctx],
            [" " + c for c in choices],
            choices,
            int(doc["gold"]),
            fewshot_text=ctx + " " + choices[int(doc["gold"])],
        )


class ArcChallenge(_Arc):
    name = "arc_challenge"
    subset = "ARC-Challenge"


class ArcEasy(_Arc):
    name = "arc_easy"
    subset = "ARC-Easy"


class WinoGrande(MultipleChoiceTask):
    name = "winogrande"
    split = "validation"
    metrics = ("acc",)

    def load(self, split: str) -> list[dict]:
        return benchdata.winogrande(split)

    def to_item(self, doc: dict) -> MCItem:
        s = doc["sentence"]
        i = s.index("_")
        options = [doc["option1"], doc["option2"]]
        contexts = [s[:i] + o for o in options]
        target = " " + s[i + 1 :].strip()
        gold = int(doc["answer"]) - 1
        # acc_norm is not a WinoGrande metric; choices hold the shared continuation so lengths are equal
        return MCItem(doc["id"], contexts, [target], [target.strip()] * 2, gold, fewshot_text=contexts[gold] + target)
