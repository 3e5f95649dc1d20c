"""KL(reference || model) per token on varied English: the forgetting proxy closest to the base's behaviour.

``kl_base`` (default KL_TOKENS scored tokens) or ``kl_base:<tokens>``: texts from texts.english_texts (five
English sources interleaved) are taken in order until ``tokens`` tokens are scored past the first KL_FIRST
positions of each text. The reference is ctx.reference_model (the base model). Metrics, in nats per token:

- ``kl``: token-weighted mean over every scored token except the first KL_FIRST positions after the BOS
  stand-in, with ``kl_stderr`` (texts as clusters, ratio-estimator standard error);
- ``kl_first`` (and ``kl_first_stderr``): the same over those first positions alone. CPT packs documents, so
  training rarely sees a text start right after BOS: a format shift there measures drift, not forgetting;
- ``kl_text_mean``: the mean of per-text means (the old headline; short texts weigh as much as long ones).

Cost: the base model's side is computed once per base model and text set and cached (kl_cache: 0.98 GB of disk
per 10k tokens), so each checkpoint runs one forward pass over the texts, packed several to a sequence
(token_windows). Measured on the embedded 135M model, 2k tokens, CPU time on one thread, one run: the former
two-pass scoring 17.1 s; the first checkpoint (which builds the cache) 13.5 s; every later one 7.8 s (2.2x
less). Small reference models (tests) skip the cache: for them a second pass is cheaper than the file.

Example::

    >>> parts = kl_per_text(tuned, base, tok, ["The cat sat on the mat."])[0]   # (sum, n, first_sum, first_n)
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..errors import LorascopeError
from .base import EvalContext, TaskResult
from .engine import max_length, output_head
from .kl_cache import base_logprobs, kl_rows, row_offsets, worth_caching
from .results import items_in_split, mean_stderr
from .texts import english_texts
from .token_windows import largest_batch, pack_width, packed_batches, pad_id, reused_head_output, target_logits, windows

KL_TOKENS = 10_000
KL_FIRST = 4  # positions after BOS reported apart as kl_first


@torch.inference_mode()
def kl_per_text(
    model,
    reference,
    tokenizer,
    texts: list[str],
    first: int = KL_FIRST,
    window: int | None = None,
    token_budget: int = 1024,
    progress: bool = False,
    cache: bool | None = None,
) -> list[tuple[float, int, float, int]]:
    """Per text: (sum of KL(reference || model) in nats over positions > ``first``, their count, the sum over
    positions 1..``first``, their count); same windows as text_nll. ``cache``: the reference's side comes from
    (or is written to) the kl_cache, so only the model runs a forward pass; else both run. Default: cache when
    the reference is worth it (kl_cache.worth_caching)."""
    window = min(window or 1024, max_length(model))
    rows = windows(tokenizer, texts, window, window // 2)
    out = [[0.0, 0, 0.0, 0] for _ in texts]
    same = reference is model  # the base against itself: KL is exactly 0, no forward pass needed
    pad = pad_id(tokenizer)
    model.eval()
    reference.eval()
    if cache is None:
        cache = worth_caching(reference)
    stored = base_logprobs(reference, rows, pad, token_budget, progress) if cache and not same else None
    off = row_offsets(rows)
    plan = packed_batches(rows, token_budget, pack_width(model))
    most = largest_batch(rows, plan)
    if stored is None and output_head(model) is output_head(reference):
        most = 0  # one head module for both: the reference's pass would overwrite the model's logits in its buffer
    with reused_head_output(model, most), reused_head_output(reference, most if stored is None else 0):
        for seqs in tqdm(plan, desc="kl_base", disable=not progress, dynamic_ncols=True):
            kls = (
                {r: None for s in seqs for r in s} if same else _kl_rows(model, reference, rows, seqs, pad, stored, off)
            )
            for r, kl in kls.items():
                i, _, tgt, start = rows[r]
                per = [0.0] * len(tgt) if kl is None else kl.tolist()
                for pos, v in enumerate(per, start):
                    k = 2 if pos <= first else 0
                    out[i][k] += v
                    out[i][k + 1] += 1
    return [tuple(o) for o in out]


def _kl_rows(
    model, reference, rows: list, seqs: list[list[int]], pad: int, stored, off: list[int]
) -> dict[int, torch.Tensor]:
    """KL(reference || model) at the scored positions of the rows packed in ``seqs``: one tensor per row."""
    lqs = target_logits(model, rows, seqs, pad)
    if stored is None:
        lps = target_logits(reference, rows, seqs, pad)
        return {r: kl_rows(lps[r], lq.to(lps[r].device)) for r, lq in lqs.items()}
    return {r: kl_rows(stored[off[r] : off[r + 1]], lq) for r, lq in lqs.items()}


def _ratio(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """Token-weighted mean sum(s)/sum(n) and its standard error with texts as clusters (ratio estimator)."""
    total = sum(counts)
    if not total:
        return math.nan, math.nan
    r, m = sum(sums) / total, len(counts)
    if m < 2:
        return r, math.nan
    var = sum((s - r * n) ** 2 for s, n in zip(sums, counts)) / (m * (m - 1))
    return r, math.sqrt(var) / (total / m)


def kl_metrics(samples: list[dict]) -> dict[str, float]:
    """kl / kl_first (token-weighted, with stderr) and kl_text_mean from kl_base sample lines."""
    kl, se = _ratio([s["kl_sum"] for s in samples], [s["tokens"] for s in samples])
    kf, sef = _ratio([s["kl_first_sum"] for s in samples], [s["first_tokens"] for s in samples])
    tm, _ = mean_stderr([s["kl_sum"] / s["tokens"] for s in samples if s["tokens"]])
    return {"kl": kl, "kl_stderr": se, "kl_first": kf, "kl_first_stderr": sef, "kl_text_mean": tm}


def select_texts(tokenizer, tokens: int, exclude=(), first: int = KL_FIRST) -> list[dict]:
    """English texts in pool order until ``tokens`` tokens past the first ``first`` positions are covered."""
    out, n = [], 0
    for d in english_texts(exclude=exclude):
        if n >= tokens:
            break
        out.append(d)
        n += max(0, len(tokenizer.encode(d["text"], add_special_tokens=False)) - first)
    return out


class KLBase:
    name = "kl_base"

    def __init__(self, tokens: str | int | None = None):
        try:
            self.tokens = KL_TOKENS if tokens is None else int(tokens)
        except ValueError:
            raise LorascopeError(f"kl_base:<tokens> needs a whole number of tokens (got '{tokens}')") from None
        if self.tokens < 1:
            raise LorascopeError(f"kl_base:<tokens> must be >= 1 (got {self.tokens})")
        if tokens is not None:
            self.name = f"kl_base:{self.tokens}"

    def run(self, ctx: EvalContext) -> TaskResult:
        if ctx.reference_model is None:
            raise LorascopeError("kl_base needs a reference model (the base model; --reference)")
        docs = items_in_split(
            select_texts(ctx.tokenizer, self.tokens, ctx.excluded_ids.get(self.name, [])), ctx.split, ""
        )
        res = kl_per_text(
            ctx.model, ctx.reference_model, ctx.tokenizer, [d["text"] for d in docs], progress=ctx.progress
        )
        samples = [
            {
                "id": d["id"],
                "cluster": d["cluster"],
                "kl_sum": s,
                "tokens": n,
                "kl_first_sum": fs,
                "first_tokens": fn,
                "kl": s / n if n else None,
            }
            for d, (s, n, fs, fn) in zip(docs, res)
        ]
        return TaskResult(
            metrics=kl_metrics(samples),
            samples=samples,
            metrics_of=kl_metrics,
            info={
                "n": len(docs),
                "tokens": sum(s["tokens"] for s in samples),
                "first": KL_FIRST,
                "texts": "lorascope.evals.texts.english_texts (5 sources, interleaved)",
                "direction": "KL(reference || model)",
                "limit": "ignored: size is set in tokens",
            },
        )
