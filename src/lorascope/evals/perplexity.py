"""Continuous, low-variance proxies: bits-per-byte of gold text and KL divergence to the base model.

BPB = sum of token NLLs in nats / (ln 2 * UTF-8 bytes of the scored text); tokenizer-independent, so models
with different vocabularies compare. Per task ``bpb`` is the mean of per-item BPB (with ``bpb_stderr``) and
``bpb_corpus`` = total NLL / total bytes.

Tasks:
- ``humaneval_bpb``: the canonical solution given the HumanEval prompt (164 items).
- ``mbpp_bpb``: the reference code given OLMES' 0-shot MBPP prompt (500 items).
- ``gsm8k_bpb``: ``" " + gold chain of thought`` (calculator annotations removed, ending "So the answer is N.",
  the style of the 8 standard exemplars) given ``"Question: {q}\\nAnswer:"``; ``shots=k`` (k <= 8) prepends k of
  those exemplars. Excluded ids (ctx.excluded_ids["gsm8k_bpb"] or ["gsm8k"]) are skipped.
- ``math500_bpb``: ``" " + solution`` given ``"Problem:\\n{problem}\\n\\nSolution:"``; shots k <= 4 Minerva exemplars.
- ``english_bpb``: general English prose: HellaSwag validation contexts with their gold ending
  (``ctx_a + " " + ctx_b.capitalize() + " " + ending``, lm-eval's bracket cleaning), taken from the END of the
  split so that ``--limit`` subsets do not overlap the first items that ``hellaswag`` scores.
- ``heldout_bpb:<dataset>``: held-out documents of a training dataset (lorascope.data.heldout_texts), each cut
  to its first HELDOUT_CHARS characters, spread evenly over the split under --limit; scored with a sliding
  window (1024 tokens, stride 512) where a text is longer than the window.
- ``kl_base``: mean per-token KL(reference || model) on the english_bpb texts, reference = ctx.reference_model
  (the base); metric ``kl`` in nats per token (mean over items of the per-item token mean).

Example::

    >>> nll, ntok = text_nll(model, tok, ["The cat sat on the mat."])[0]
    >>> bits_per_byte(nll, len("The cat sat on the mat.".encode()))
"""

from __future__ import annotations

import math
import re

import torch
from tqdm.auto import tqdm

from . import sources
from .base import EvalContext, TaskResult
from .engine import Request, encode_pair, max_length, model_device, prefix_token_id, score
from .multiple_choice import hellaswag_preprocess
from .results import mean_stderr, select_items
from ..errors import LorascopeError


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (math.log(2) * n_bytes)


def _rows(tokenizer, texts: list[str], window: int, stride: int) -> list[tuple[int, list[int], list[int]]]:
    """Sliding windows: (text index, input tokens, target tokens); every token after the BOS stand-in is a
    target exactly once, with up to ``window`` tokens of left context."""
    assert 0 < stride <= window
    rows = []
    for i, text in enumerate(texts):
        toks = [prefix_token_id(tokenizer)] + tokenizer.encode(text, add_special_tokens=False)
        for s in range(1, len(toks), stride):
            e = min(s + stride, len(toks))
            inp = toks[max(0, e - 1 - window): e - 1]
            rows.append((i, inp, toks[s:e]))
    return rows


def _batches(rows: list, budget: int):
    """Rows grouped so that each batch holds at most ``budget`` padded tokens (logits are vocab-sized)."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    batch: list[int] = []
    for r in order:
        width = len(rows[batch[0]][1]) if batch else len(rows[r][1])
        if batch and (len(batch) + 1) * width > budget:
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


def _pad(seqs: list[list[int]], pad: int):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.inference_mode()
def text_nll(model, tokenizer, texts: list[str], window: int | None = None, stride: int | None = None,
             token_budget: int = 2048, progress: bool = False, desc: str = "bpb") -> list[tuple[float, int]]:
    """(NLL in nats, tokens) of each whole text, the first token conditioned on the BOS/EOS stand-in."""
    window = min(window or 1024, max_length(model))
    stride = min(stride or window // 2, window)
    rows = _rows(tokenizer, texts, window, stride)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    out = [[0.0, 0] for _ in texts]
    model.eval()
    dev = model_device(model)
    bar = tqdm(total=len(rows), desc=desc, unit="win", disable=not progress, dynamic_ncols=True)
    for b in _batches(rows, token_budget):
        ids, mask = _pad([rows[r][1] for r in b], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for j, r in enumerate(b):
            i, inp, tgt = rows[r]
            lp = logp[j, len(inp) - len(tgt): len(inp)].gather(1, torch.tensor(tgt, device=dev).unsqueeze(1))
            out[i][0] -= lp.sum().item()
            out[i][1] += len(tgt)
        bar.update(len(b))
    bar.close()
    return [(a, n) for a, n in out]


@torch.inference_mode()
def kl_per_text(model, reference, tokenizer, texts: list[str], window: int | None = None,
                token_budget: int = 1024, progress: bool = False) -> list[tuple[float, int]]:
    """(sum over tokens of KL(reference || model) in nats, tokens) per text, same windows as text_nll."""
    window = min(window or 1024, max_length(model))
    rows = _rows(tokenizer, texts, window, window // 2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    out = [[0.0, 0] for _ in texts]
    if reference is model:  # the base against itself: KL is exactly 0, no forward pass needed
        for i, _, tgt in rows:
            out[i][1] += len(tgt)
        return [(a, n) for a, n in out]
    model.eval()
    reference.eval()
    for b in tqdm(list(_batches(rows, token_budget)), desc="kl_base", disable=not progress, dynamic_ncols=True):
        ids, mask = _pad([rows[r][1] for r in b], pad)
        ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
        lq = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        rdev = model_device(reference)
        lp = torch.log_softmax(reference(input_ids=ids.to(rdev), attention_mask=mask.to(rdev)).logits.float(),
                               dim=-1).to(lq.device)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # (batch, positions)
        for j, r in enumerate(b):
            i, inp, tgt = rows[r]
            out[i][0] += kl[j, len(inp) - len(tgt): len(inp)].sum().item()
            out[i][1] += len(tgt)
    return [(a, n) for a, n in out]


def _bpb_metrics(nlls: list[float], nbytes: list[int]) -> dict[str, float]:
    per = [bits_per_byte(n, b) for n, b in zip(nlls, nbytes)]
    m, se = mean_stderr(per)
    return {"bpb": m, "bpb_stderr": se, "bpb_corpus": bits_per_byte(sum(nlls), sum(nbytes)) if nbytes else math.nan}


class ConditionalBPB:
    """BPB of a gold continuation given a context, via the scoring engine (shared few-shot prefix cached)."""

    name = ""
    exclusion_keys: tuple[str, ...] = ()
    max_shots = 0

    def docs(self) -> list[dict]:
        raise NotImplementedError

    def pair(self, doc: dict) -> tuple[str, str]:
        raise NotImplementedError

    def fewshot(self, k: int) -> str:
        return ""

    def run(self, ctx: EvalContext) -> TaskResult:
        k = ctx.shots or 0
        if k > self.max_shots:
            raise LorascopeError(f"{self.name}: shots={k} but at most {self.max_shots} exemplars exist")
        excluded = [e for key in (self.name, *self.exclusion_keys) for e in ctx.excluded_ids.get(key, [])]
        all_docs = self.docs()
        docs = select_items(all_docs, excluded, ctx.limit)
        prefix = self.fewshot(k)
        pairs = [self.pair(d) for d in docs]
        reqs = [Request(prefix + c, [x], shared_prefix=prefix) for c, x in pairs]
        scored = score(ctx.model, ctx.tokenizer, reqs, batch_size=ctx.batch_size, progress=ctx.progress,
                       desc=self.name)
        nlls, nbytes, samples = [], [], []
        for d, (c, x), res in zip(docs, pairs, scored):
            full = prefix + c
            moved = full[len(full.rstrip()):]  # trailing context whitespace is scored with the continuation
            nb = len((moved + x).encode("utf-8"))
            _, cont_tokens = encode_pair(ctx.tokenizer, full, x)
            nll = -res[0][0]
            nlls.append(nll)
            nbytes.append(nb)
            samples.append({"id": d["id"], "nll": nll, "bytes": nb, "tokens": len(cont_tokens),
                            "bpb": bits_per_byte(nll, nb), "is_greedy": res[0][1]})
        info = {"n": len(docs), "shots": k, "excluded": len(all_docs) - len(select_items(all_docs, excluded, None)),
                "example_context": reqs[0].context if reqs else None,
                "example_continuation": pairs[0][1] if pairs else None}
        return TaskResult(metrics=_bpb_metrics(nlls, nbytes), samples=samples, info=info)


class HumanEvalBPB(ConditionalBPB):
    name = "humaneval_bpb"

    def docs(self):
        return sources.humaneval()

    def pair(self, d):
        return d["prompt"], d["canonical_solution"]


class MbppBPB(ConditionalBPB):
    name = "mbpp_bpb"

    def docs(self):
        return sources.mbpp()

    def pair(self, d):
        return d["olmes_prompt"], d["code"]


def gsm8k_cot_answer(answer: str) -> str:
    """GSM8K gold answer in the exemplars' style: no <<calc>> annotations, one line, "So the answer is N."."""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<.*?>>", "", body).strip()
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    return " ".join(lines + [f"So the answer is {final.strip()}."])


class Gsm8kBPB(ConditionalBPB):
    name = "gsm8k_bpb"
    exclusion_keys = ("gsm8k",)
    max_shots = 8

    def docs(self):
        return sources.gsm8k()

    def pair(self, d):
        return f"Question: {d['question']}\nAnswer:", " " + gsm8k_cot_answer(d["answer"])

    def fewshot(self, k):
        return "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in sources.gsm8k_fewshot()[:k])


class Math500BPB(ConditionalBPB):
    name = "math500_bpb"
    exclusion_keys = ("math500",)
    max_shots = 4

    def docs(self):
        return sources.math500()

    def pair(self, d):
        return f"Problem:\n{d['problem']}\n\nSolution:", " " + d["solution"]

    def fewshot(self, k):
        return "".join(f"Problem:\n{s['problem']}\n\nSolution: {s['solution']}\n\n"
                       for s in sources.math500_fewshot()[:k])


def english_texts(limit: int | None = None) -> list[dict]:
    """[{id, text}] of general English prose (HellaSwag validation context + gold ending, from the end)."""
    docs = sources.hellaswag()[::-1]
    docs = docs[:limit] if limit is not None else docs
    out = []
    for d in docs:
        text = d["ctx_a"] + " " + d["ctx_b"].capitalize() + " " + d["endings"][d["label"]]
        out.append({"id": d["id"], "text": hellaswag_preprocess(text)})
    return out


class _TextBPB:
    name = ""

    def texts(self, ctx: EvalContext) -> list[dict]:
        raise NotImplementedError

    def run(self, ctx: EvalContext) -> TaskResult:
        docs = self.texts(ctx)
        res = text_nll(ctx.model, ctx.tokenizer, [d["text"] for d in docs], progress=ctx.progress, desc=self.name)
        nbytes = [len(d["text"].encode("utf-8")) for d in docs]
        samples = [{"id": d["id"], "nll": nll, "tokens": nt, "bytes": nb, "bpb": bits_per_byte(nll, nb)}
                   for d, (nll, nt), nb in zip(docs, res, nbytes)]
        metrics = _bpb_metrics([r[0] for r in res], nbytes)
        return TaskResult(metrics=metrics, samples=samples,
                          info={"n": len(docs), "shots": 0, "window": 1024, "stride": 512})


class EnglishBPB(_TextBPB):
    name = "english_bpb"

    def texts(self, ctx):
        return [d for d in english_texts() if str(d["id"]) not in {str(e) for e in ctx.excluded_ids.get(self.name, [])}
                ][: ctx.limit]


HELDOUT_CHARS = 1500  # ~410 tokens of Python on average: one window, no overlap cost


class HeldoutBPB(_TextBPB):
    """BPB on a training dataset's held-out split. Held-out documents are whole source files of very different
    lengths (up to 150 kB), so each contributes its first HELDOUT_CHARS characters (cut at a line end): the cost
    per item is bounded and long files do not dominate; with --limit, items are spread evenly over the split
    (which is ordered by package) instead of taking the first package only."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.name = f"heldout_bpb:{dataset}"

    def texts(self, ctx):
        from ..data import heldout_texts  # written separately; imported only when this task runs

        texts = heldout_texts(self.dataset)
        if not texts:
            raise LorascopeError(f"dataset '{self.dataset}' has no held-out documents")
        idx = list(range(len(texts)))
        if ctx.limit and ctx.limit < len(texts):
            idx = sorted({round(i * (len(texts) - 1) / max(1, ctx.limit - 1)) for i in range(ctx.limit)})
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


class KLBase:
    name = "kl_base"

    def run(self, ctx: EvalContext) -> TaskResult:
        if ctx.reference_model is None:
            raise LorascopeError("kl_base needs a reference model (the base model; --reference)")
        docs = [d for d in english_texts()][: ctx.limit]
        res = kl_per_text(ctx.model, ctx.reference_model, ctx.tokenizer, [d["text"] for d in docs],
                          progress=ctx.progress)
        per = [s / n for s, n in res]
        m, se = mean_stderr(per)
        tot = sum(n for _, n in res)
        metrics = {"kl": m, "kl_stderr": se, "kl_token_mean": sum(s for s, _ in res) / tot if tot else math.nan}
        samples = [{"id": d["id"], "kl_sum": s, "tokens": n, "kl": s / n} for d, (s, n) in zip(docs, res)]
        return TaskResult(metrics=metrics, samples=samples,
                          info={"n": len(docs), "texts": "english_bpb texts", "direction": "KL(reference || model)"})
