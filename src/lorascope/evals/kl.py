"""KL(reference || model) per token on varied English: the forgetting proxy closest to the base's behaviour.

``kl_base`` (default KL_TOKENS scored tokens) or ``kl_base:<tokens>``: texts from texts.english_texts (five
English sources interleaved) are taken in order until ``tokens`` tokens are scored past the first KL_FIRST
positions of each text. The reference is ctx.reference_model (the base model). Metrics, in nats per token:

- ``kl``: token-weighted mean over every scored token except the first KL_FIRST positions after the BOS
  stand-in, with ``kl_stderr`` (texts as clusters, ratio-estimator standard error);
- ``kl_first`` (and ``kl_first_stderr``): the same over those first positions alone. CPT packs documents, so
  training rarely sees a text start right after BOS: a format shift there measures drift, not forgetting;
- ``kl_text_mean``: the mean of per-text means (the old headline; short texts weigh as much as long ones).

Cost: the base model's side is computed once per base model and text set and cached (kl_cache: 92 MB of disk
per 10k tokens on the embedded model), so each checkpoint runs one forward pass over the texts, packed several
to a sequence (token_windows), and its head chunk by chunk (vocab_head); a checkpoint whose head differs from
the base's also runs the base's head on the cached hidden states. Measured on the embedded model (1,119 tokens,
one thread, process CPU time on a shared machine, bench/eval_throughput.py): two-pass 10.0 s; from the cache 4.7
s with the base's head (LoRA), 6.5 s with a moved one (full FT); building the cache 12-14 s, 10.3 MB. Small
reference models (tests) skip the cache: for them a second pass is cheaper than the file.

Example::

    >>> parts = kl_per_text(tuned, base, tok, ["The cat sat on the mat."])[0]   # (sum, n, first_sum, first_n)
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import LorascopeError
from .base import EvalContext, TaskResult
from .engine import max_length
from .kl_cache import base_side, kl_rows, kl_same_head, row_offsets, worth_caching
from .results import items_in_split, mean_stderr, token_weighted_mean
from .texts import english_texts
from .token_windows import pack_width, packed_batches, pad_id, target_hidden, windows
from .vocab_head import VocabHead, blockable, kl_between

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
    stored = base_side(reference, rows, pad, token_budget, progress) if cache and not same else None
    off = row_offsets(rows)
    heads = (VocabHead(reference), VocabHead(model))  # one logits buffer each, for every batch
    fast = stored is not None and same_head(*heads)
    for seqs in tqdm(packed_batches(rows, token_budget, pack_width(model)), desc="kl_base", disable=not progress):
        if same:
            kls = {r: [0.0] * len(rows[r][2]) for s in seqs for r in s}
        else:
            kls = _kl_batch(model, reference, rows, seqs, pad, heads, stored, off, fast)
        for r, per in kls.items():
            i, _, _, start = rows[r]
            for pos, v in enumerate(per, start):
                k = 2 if pos <= first else 0
                out[i][k] += v
                out[i][k + 1] += 1
    return [tuple(o) for o in out]


def same_head(a: VocabHead, b: VocabHead) -> bool:
    """Whether two heads give the same logits from the same hidden states, as plain linear maps (no bias, no
    soft-capping): kl_cache's one-pass formula holds."""
    plain = all(h.plain and not h.softcap and h.module.bias is None for h in (a, b))
    return plain and a.weight.shape == b.weight.shape and bool(torch.equal(a.weight, b.weight))


def _kl_batch(model, reference, rows, seqs, pad, heads, stored, off, fast) -> dict[int, list[float]]:
    """KL(reference || model) at the scored positions of the rows packed in ``seqs``, per row."""
    head_p, head_q = heads
    h_q, spans = target_hidden(model, rows, seqs, pad)
    if stored is not None:
        side = torch.from_numpy(np.concatenate([stored[off[r] : off[r + 1]] for r in spans]))
        if fast:
            kl = kl_same_head(side, h_q, head_q)
        else:
            kl = _kl_logits(head_p, side[:, : h_q.shape[1]].to(h_q), head_q, h_q)
    else:
        h_p, _ = target_hidden(reference, rows, seqs, pad)  # the same packing: the same positions in order
        kl = _kl_logits(head_p, h_p.to(h_q.device), head_q, h_q)
    per = kl.tolist()
    return {r: per[c] for r, c in spans.items()}


def _kl_logits(head_p: VocabHead, h_p: torch.Tensor, head_q: VocabHead, h_q: torch.Tensor) -> torch.Tensor:
    """KL from both sides' logits, the two heads run chunk by chunk in step (each into its own buffer)."""
    if head_p.vocab != head_q.vocab:
        raise LorascopeError(
            f"kl_base: the reference's vocabulary ({head_p.vocab}) is not the model's ({head_q.vocab})"
        )
    if blockable(head_p, h_p, head_q, h_q):
        return kl_between(head_p, h_p, head_q, h_q)
    out = torch.empty(h_q.shape[0], dtype=torch.float32, device=h_q.device)
    for (c, zp), (_, zq) in zip(head_p.chunks(h_p), head_q.chunks(h_q)):
        out[c] = kl_rows(zp, zq)
    return out


def kl_metrics(samples: list[dict]) -> dict[str, float]:
    """kl / kl_first (token-weighted, with stderr) and kl_text_mean from kl_base sample lines."""
    kl, se = token_weighted_mean([s["kl_sum"] for s in samples], [s["tokens"] for s in samples])
    kf, sef = token_weighted_mean([s["kl_first_sum"] for s in samples], [s["first_tokens"] for s in samples])
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
