"""Log-likelihood scoring of (context, continuations) requests with shared-prefix KV caching.

Numbers are those of lm-evaluation-harness' ``loglikelihood``: the context's trailing whitespace moves to the
continuation, context and context+continuation are encoded without special tokens, the continuation tokens are
``whole[len(context_tokens):]`` and the model reads ``context_tokens + continuation_tokens`` (an empty context
becomes the BOS/EOS token). The result per continuation is the sum of its tokens' log-probabilities and
whether greedy decoding would have produced exactly those tokens.

What is faster than lm-eval (and why it gives the same numbers up to float rounding):
1. A multiple-choice item's context is run once; its KV cache is copied to the choices, which then run only
   their own tokens (lm-eval runs context+choice once per choice).
2. A prefix shared by many items (the few-shot block) is run once per task and its cache reused; the
   ``shared_prefix`` hint of a request says which string that is, the engine finds the common token prefix.
3. Logits are computed only where they are scored: the last context token is re-fed with the choice so every
   choice row's logits line up with its continuation tokens, and the context pass needs no vocabulary head.
Padding is on the right everywhere, so no query row is fully masked (that would put NaNs into the cache).

Example::

    >>> from lorascope.evals.engine import Request, score
    >>> reqs = [Request("Question: 2+2?\\nAnswer:", [" 4", " 5"])]
    >>> res = score(model, tokenizer, reqs)          # [[(loglik, is_greedy), (loglik, is_greedy)]]
    >>> res[0][0][0] > res[0][1][0]
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

MIN_SHARED = 8  # tokens; a shorter common prefix is not worth a separate cache
CHOICE_ROWS = 16  # choice rows per forward pass


@dataclass
class Request:
    """One item: a context and its candidate continuations (1 for BPB, N for multiple choice)."""

    context: str
    continuations: list[str]
    shared_prefix: str = ""
    """Leading part of ``context`` that many requests share (e.g. the few-shot examples); a hint only."""


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing context whitespace goes to the continuation; split by token count."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def prefix_token_id(tokenizer) -> int:
    """Token standing in for an empty context (lm-eval: the EOT/BOS token)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to stand in for an empty context")
    return tid


def max_length(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


@dataclass
class _Item:
    ctx: list[int]
    conts: list[list[int]]
    shared: int = 0  # tokens of ctx covered by the group cache


def _tokenize(tokenizer, req: Request, max_len: int) -> _Item:
    pairs = [encode_pair(tokenizer, req.context, c) for c in req.continuations]
    ctx = pairs[0][0] if pairs else []
    if not ctx:
        ctx = [prefix_token_id(tokenizer)]
    conts = [p[1] for p in pairs]
    if any(len(c) == 0 for c in conts):
        raise ValueError(f"empty continuation after tokenisation in request with context {req.context[-60:]!r}")
    longest = max(len(c) for c in conts)
    if longest >= max_len:
        raise ValueError(f"a continuation of {longest} tokens does not fit the model's {max_len}-token window")
    if len(ctx) + longest > max_len:  # lm-eval keeps the right end of context+continuation
        ctx = ctx[-(max_len - longest):]
    return _Item(ctx, conts)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _select(cache, index: list[int]):
    # a private copy: the model appends to the cache it is given, and the source cache is reused
    c = copy.deepcopy(cache)
    c.batch_select_indices(torch.tensor(index, dtype=torch.long, device=c.layers[0].keys.device))
    return c


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, ids, mask, positions, cache):
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    dev = model_device(model)
    ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    # logits_to_keep=1: the context pass only fills the cache; skip the vocabulary head for all but one position
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    return cache


@torch.inference_mode()
def _prefix_cache(model, tokens: list[int]):
    ids = torch.tensor([tokens], dtype=torch.long)
    return _forward(model, ids, torch.ones_like(ids), torch.arange(len(tokens)).unsqueeze(0), None)


@torch.inference_mode()
def _score_batch(model, items: list[_Item], group_cache, group_len: int, pad: int):
    """Score a batch of items that share the first ``group_len`` context tokens (cached in group_cache)."""
    b = len(items)
    # 1. item contexts except their last token, after the shared group prefix
    rests = [it.ctx[group_len:-1] for it in items]
    empty = [i for i, r in enumerate(rests) if not r]
    if group_len == 0 and 0 < len(empty) < b:
        # an all-padding row with nothing cached before it would be a fully masked query (NaN in the cache):
        # score single-token contexts separately
        full = [i for i in range(b) if rests[i]]
        res = dict(zip(empty, _score_batch(model, [items[i] for i in empty], None, 0, pad)))
        res.update(zip(full, _score_batch(model, [items[i] for i in full], None, 0, pad)))
        return [res[i] for i in range(b)]
    past_mask = torch.ones((b, group_len), dtype=torch.long)
    cache = _select(group_cache, [0] * b) if group_cache is not None else None
    if any(rests):
        ids, mask = _pad([r if r else [pad] for r in rests], pad)
        for i, r in enumerate(rests):
            if not r:
                mask[i, 0] = 0
        positions = group_len + torch.arange(ids.shape[1]).unsqueeze(0).expand(b, -1)
        cache = _forward(model, ids, torch.cat([past_mask, mask], 1), positions, cache)
        past_mask = torch.cat([past_mask, mask], 1)
    # 2. choices: [last context token] + continuation[:-1], logits aligned with the continuation tokens.
    # Rows are length-sorted into sub-batches (each with its own slice of the cache) to cut padding.
    owner, rows = [], []
    for i, it in enumerate(items):
        for c in it.conts:
            owner.append(i)
            rows.append([it.ctx[-1]] + c[:-1])
    targets = [c for it in items for c in it.conts]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    results: list[list] = [[None] * len(it.conts) for it in items]
    slot = [j for it in items for j in range(len(it.conts))]
    dev = model_device(model)
    for s in range(0, len(order), CHOICE_ROWS):
        sub = order[s: s + CHOICE_ROWS]
        ids, mask = _pad([rows[r] for r in sub], pad)
        own = [owner[r] for r in sub]
        positions = torch.tensor([len(items[o].ctx) - 1 for o in own]).unsqueeze(1) + torch.arange(ids.shape[1])
        if cache is not None and past_mask.shape[1] > 0:
            sub_cache = _select(cache, own)
            full_mask = torch.cat([past_mask[own], mask], 1)
        else:
            sub_cache, full_mask = None, mask
        out = model(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), position_ids=positions.to(dev),
                    past_key_values=sub_cache, use_cache=sub_cache is not None)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        for j, r in enumerate(sub):
            tgt = targets[r]
            t = torch.tensor(tgt, device=logp.device)
            lp = logp[j, : len(tgt)]
            results[owner[r]][slot[r]] = (lp.gather(1, t.unsqueeze(1)).sum().item(), bool((lp.argmax(-1) == t).all()))
    return results


def score(model, tokenizer, requests: Sequence[Request], batch_size: int = 8, progress: bool = False,
          desc: str = "scoring") -> list[list[tuple[float, bool]]]:
    """(loglik, is_greedy) for every continuation of every request, in order. ``batch_size`` counts items."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    max_len = max_length(model)
    items = [_tokenize(tokenizer, r, max_len) for r in requests]
    # group items by their shared-prefix hint; each group caches its common token prefix once
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.shared_prefix, []).append(i)
    plan: list[tuple[list[int], list[int]]] = []  # (item indices, group prefix tokens)
    for hint, idx in groups.items():
        shared: list[int] = []
        if hint:
            ptoks = tokenizer.encode(hint, add_special_tokens=False)
            # the hint's own tokens can differ from the item's at the seam ("\n\n" + "Q" vs "\n" "\nQ"), so use
            # the common token prefix; items that share too little are scored without the group cache
            lcps = {i: min(_lcp(ptoks, items[i].ctx), len(items[i].ctx) - 1) for i in idx}
            good = [i for i in idx if lcps[i] >= MIN_SHARED]
            if good:
                n = min(lcps[i] for i in good)
                shared = ptoks[:n]
                plan.append((good, shared))
            idx = [i for i in idx if lcps[i] < MIN_SHARED]
        if idx:
            plan.append((idx, []))
    was_training = model.training
    model.eval()
    results: list = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    try:
        for idx, shared in plan:
            gcache = _prefix_cache(model, shared) if shared else None
            # longest first: batches of similar length waste less padding
            idx = sorted(idx, key=lambda i: -(len(items[i].ctx) + max(len(c) for c in items[i].conts)))
            for s in range(0, len(idx), batch_size):
                chunk = idx[s: s + batch_size]
                out = _score_batch(model, [items[i] for i in chunk], gcache, len(shared), pad)
                for i, o in zip(chunk, out):
                    results[i] = o
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return results


@torch.inference_mode()
def score_naive(model, tokenizer, requests: Sequence[Request], batch_size: int = 8, progress: bool = False
                ) -> list[list[tuple[float, bool]]]:
    """Reference: every (context, continuation) as its own full sequence, as lm-eval's HF backend does."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    max_len = max_length(model)
    flat = []  # (request index, full input tokens, continuation tokens)
    for ri, r in enumerate(requests):
        it = _tokenize(tokenizer, r, max_len)
        for c in it.conts:
            flat.append((ri, (it.ctx + c)[-(max_len + 1):][:-1], c))
    slots = [j for r in requests for j in range(len(r.continuations))]
    results: list[list] = [[None] * len(r.continuations) for r in requests]
    order = sorted(range(len(flat)), key=lambda k: -len(flat[k][1]))  # lm-eval sorts by length, longest first
    model.eval()
    for s in tqdm(range(0, len(flat), batch_size), disable=not progress, desc="naive scoring"):
        ks = order[s: s + batch_size]
        chunk = [flat[k] for k in ks]
        ids, mask = _pad([c[1] for c in chunk], pad)
        dev = model_device(model)
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), dim=-1)
        for r, (k, (ri, inp, cont)) in enumerate(zip(ks, chunk)):
            n = len(inp)
            lp = logp[r, n - len(cont): n]
            t = torch.tensor(cont, device=logp.device)
            results[ri][slots[k]] = (lp.gather(1, t.unsqueeze(1)).sum().item(), bool((lp.argmax(-1) == t).all()))
    return results
