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
4. Passes are sized in padded tokens, not rows: choices of many items are length-sorted together and cut
   into passes by a small dynamic programme (a pass has a fixed cost, so short rows are packed many to one).
Padding is on the right everywhere, so no query row is fully masked (that would put NaNs into the cache).

Example::

    >>> from lorascope.evals.engine import Request, score
    >>> reqs = [Request("Question: 2+2?\\nAnswer:", [" 4", " 5"])]
    >>> res = score(model, tokenizer, reqs)          # [[(loglik, is_greedy), (loglik, is_greedy)]]
    >>> res[0][0][0] > res[0][1][0]
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

MIN_SHARED = 8  # tokens; a shorter common prefix is not worth a separate cache
PASS_OVERHEAD = 64  # tokens; the fixed cost of one forward pass in units of per-token cost (measured on CPU)
CHUNK_BATCHES = 8  # passes per chunk: choices of a chunk's items are length-sorted together, cutting padding


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


def _passes(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Split length-sorted (longest first) rows into passes of at most ``budget`` padded tokens each.

    A forward pass costs a fixed time (streaming the weights: on a CPU about PASS_OVERHEAD tokens' worth) plus
    a time per padded token, so a short dynamic programme picks the cut points that minimise the total; the
    result packs short rows (a choice of a dozen tokens) many to a pass and keeps similar lengths together.
    """
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            width = lengths[order[i]]  # the longest row of order[i:j]
            if (j - i) * width > budget and j - i > 1:
                break
            c = best[i] + PASS_OVERHEAD + (j - i) * width
            if c < best[j]:
                best[j], cut[j] = c, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        out.append(order[cut[j]: j])
        j = cut[j]
    return out[::-1]


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


def _layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def _prefix_cache(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.tensor([tokens], dtype=torch.long)
    return _layers_kv(_forward(model, ids, torch.ones_like(ids), torch.arange(len(tokens)).unsqueeze(0), None))


@torch.inference_mode()
def _context_kv(model, items: list[_Item], group_kv, group_len: int, pad: int, budget: int) -> list:
    """Per item, per layer, the (keys, values) of its context after the group prefix and before its last token.

    Items run in passes of at most ``budget`` tokens, sorted by length so a pass carries little padding; an item
    whose context is only its last token has nothing to run (its choices re-feed that token) and gets None.
    """
    out: list = [None] * len(items)
    todo = sorted((i for i, it in enumerate(items) if len(it.ctx) - 1 > group_len), key=lambda i: -len(items[i].ctx))
    for sub in _passes(todo, [len(it.ctx) - 1 - group_len for it in items], budget):
        b = len(sub)
        rests = [items[i].ctx[group_len:-1] for i in sub]
        ids, mask = _pad(rests, pad)
        positions = group_len + torch.arange(ids.shape[1]).unsqueeze(0).expand(b, -1)
        if group_kv is not None:
            from transformers import DynamicCache

            # expanded views: the model concatenates new keys onto them, which copies once anyway
            cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in group_kv])
            mask = torch.cat([torch.ones((b, group_len), dtype=torch.long), mask], 1)
        else:
            cache = None
        kv = _layers_kv(_forward(model, ids, mask, positions, cache))
        for j, i in enumerate(sub):
            n = len(rests[j])
            out[i] = [(k[j: j + 1, :, group_len: group_len + n], v[j: j + 1, :, group_len: group_len + n])
                      for k, v in kv]
    return out


def _past(owners: list[int], ctx_kv: list, group_kv, group_len: int):
    """Cache and attention mask of the past for choice rows: group prefix + each owner's context, right-padded."""
    from transformers import DynamicCache

    lens = [0 if ctx_kv[o] is None else ctx_kv[o][0][0].shape[2] for o in owners]
    width = max(lens)
    b = len(owners)
    mask = torch.zeros((b, group_len + width), dtype=torch.long)
    mask[:, :group_len] = 1
    for j, n in enumerate(lens):
        mask[j, group_len: group_len + n] = 1
    if group_len + width == 0:
        return None, mask
    layers = []
    like = group_kv if group_kv is not None else next(kv for kv in ctx_kv if kv is not None)  # shapes, dtype
    for layer in range(len(like)):
        kv = []
        for t in (0, 1):
            ref = like[layer][t]
            x = ref.new_zeros((b, ref.shape[1], group_len + width, ref.shape[3]))
            if group_kv is not None:
                x[:, :, :group_len] = group_kv[layer][t][0]
            for j, o in enumerate(owners):
                if lens[j]:
                    x[j, :, group_len: group_len + lens[j]] = ctx_kv[o][layer][t][0]
            kv.append(x)
        layers.append(tuple(kv))
    return DynamicCache(layers), mask


@torch.inference_mode()
def _score_chunk(model, items: list[_Item], group_kv, group_len: int, pad: int, rows: int):
    """Score items that share the first ``group_len`` context tokens (their KV in group_kv).

    A pass holds as many padded tokens as ``rows`` of the chunk's longest context+continuation would, i.e. the
    activation memory of a ``rows``-sequence pass of the naive method on the same items.
    """
    budget = rows * max(len(it.ctx) - group_len + max(len(c) for c in it.conts) for it in items)
    ctx_kv = _context_kv(model, items, group_kv, group_len, pad, budget)
    # choices: [last context token] + continuation[:-1], so the logits line up with the continuation tokens.
    # All choice rows of the chunk are length-sorted into passes, each with its own padded past.
    owner, slot, inputs, targets = [], [], [], []
    for i, it in enumerate(items):
        for j, c in enumerate(it.conts):
            owner.append(i)
            slot.append(j)
            inputs.append([it.ctx[-1]] + c[:-1])
            targets.append(c)
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
    results: list[list] = [[None] * len(it.conts) for it in items]
    dev = model_device(model)
    for sub in _passes(order, [len(x) for x in inputs], budget):
        own = [owner[r] for r in sub]
        ids, mask = _pad([inputs[r] for r in sub], pad)
        positions = torch.tensor([len(items[o].ctx) - 1 for o in own]).unsqueeze(1) + torch.arange(ids.shape[1])
        cache, past_mask = _past(own, ctx_kv, group_kv, group_len)
        out = model(input_ids=ids.to(dev), attention_mask=torch.cat([past_mask, mask], 1).to(dev),
                    position_ids=positions.to(dev), past_key_values=cache, use_cache=cache is not None)
        logits = out.logits
        for j, r in enumerate(sub):
            tgt = targets[r]
            t = torch.tensor(tgt, device=logits.device)
            # log-softmax only over this row's scored positions, not the padding
            lp = torch.log_softmax(logits[j, : len(tgt)].float(), dim=-1)
            results[owner[r]][slot[r]] = (lp.gather(1, t.unsqueeze(1)).sum().item(), bool((lp.argmax(-1) == t).all()))
    return results


def score(model, tokenizer, requests: Sequence[Request], batch_size: int = 8, progress: bool = False,
          desc: str = "scoring") -> list[list[tuple[float, bool]]]:
    """(loglik, is_greedy) for every continuation of every request, in order.

    ``batch_size`` sets the padded tokens per forward pass: as many as ``batch_size`` sequences of the naive
    method (context + continuation) on the same items; shorter rows (choices alone) are packed more per pass.
    """
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
    chunk_items = CHUNK_BATCHES * batch_size
    try:
        for idx, shared in plan:
            gkv = _prefix_cache(model, shared) if shared else None
            # longest first, so the chunks (and the passes inside them) hold items of similar length
            idx = sorted(idx, key=lambda i: -(len(items[i].ctx) + max(len(c) for c in items[i].conts)))
            for s in range(0, len(idx), chunk_items):
                chunk = idx[s: s + chunk_items]
                out = _score_chunk(model, [items[i] for i in chunk], gkv, len(shared), pad, batch_size)
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
