"""Log-likelihood scoring of (context, continuations) requests with shared-prefix KV caching.

Numbers are those of lm-evaluation-harness' ``loglikelihood``: the context's trailing whitespace moves to the
continuation, context and context+continuation are encoded without special tokens, the continuation tokens are
``whole[len(context_tokens):]`` and the model reads ``context_tokens + continuation_tokens`` (an empty context
becomes the BOS/EOS token). The result per continuation is the sum of its tokens' log-probabilities and
whether greedy decoding would have produced exactly those tokens.

What is faster than lm-eval (and why it gives the same numbers up to float rounding):
1. A multiple-choice item's context is run once; its KV cache is copied to the choices, which then run only
   their own tokens (lm-eval runs context+choice once per choice).
2. A prefix shared by many items (the few-shot block) is run once and its cache reused; the ``shared_prefix``
   hint of a request says which string that is, the engine finds the common token prefix.
3. Items whose contexts start alike beyond that (WinoGrande's two contexts share the text before the blank)
   run the common part once: a "follower" runs only its own tail on top of its "leader's" cache.
4. The vocabulary head and log-softmax run only at scored positions: a forward pre-hook on the output
   embedding keeps just those hidden states (context passes keep none), so padding costs no unembedding, and
   the head then runs on them chunk by chunk into one reused buffer (vocab_head.py): no positions x
   vocabulary tensor is ever whole.
5. Passes are sized in padded tokens, not rows: rows of many items (of different groups, so of different
   tasks when their requests are scored together) are length-sorted and cut into passes by a small dynamic
   programme that weighs the fixed cost of a pass, timed on the model at start-up, against its tokens.
Padding is on the right everywhere, so no query row is fully masked (that would put NaNs into the cache).
KV at a position depends only on the tokens before it, so none of this changes a number beyond rounding.

Example::

    >>> from lorascope.evals.engine import Request, score
    >>> reqs = [Request("Question: 2+2?\\nAnswer:", [" 4", " 5"])]
    >>> res = score(model, tokenizer, reqs)          # [[(loglik, is_greedy), (loglik, is_greedy)]]
    >>> res[0][0][0] > res[0][1][0]
    True
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .vocab_head import VocabHead, captured_hidden

MIN_SHARED = 8  # tokens; a shorter common prefix is not worth a separate cache
MIN_SIBLING = 4  # tokens; items sharing at least this much context beyond their group prefix run it once
PASS_OVERHEAD = 64  # tokens; fallback cost of a pass for callers of _passes that have no timing of their own
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
    return ctx, whole[len(ctx) :]


def prefix_token_id(tokenizer) -> int:
    """Token standing in for an empty context (lm-eval: the EOT/BOS token)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to stand in for an empty context")
    return tid


def max_length(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class _Item:
    ctx: list[int]
    conts: list[list[int]]
    group: int = 0  # index into the group prefixes; 0 is the empty prefix


@dataclass
class _Seg:
    """The first ``n`` positions of a cached stretch of tokens: per layer (keys, values), each [1, H, >=n, D]."""

    kv: list
    n: int


def _tokenize(tokenizer, req: Request, max_len: int) -> list[tuple[_Item, list[int]]]:
    """The request's items with the indices of the continuations each holds (one item unless truncated).

    lm-eval keeps the last ``max_len`` tokens of context + continuation[:-1] per continuation, so a context
    too long for the window is cut by an amount that depends on the continuation's length; continuations
    that end up with different contexts become separate items.
    """
    pairs = [encode_pair(tokenizer, req.context, c) for c in req.continuations]
    ctx = pairs[0][0] if pairs else []
    if not ctx:
        ctx = [prefix_token_id(tokenizer)]
    conts = [p[1] for p in pairs]
    if any(len(c) == 0 for c in conts):
        raise ValueError(f"empty continuation after tokenisation in request with context {req.context[-60:]!r}")
    longest = max(len(c) for c in conts)
    if longest > max_len:
        raise ValueError(f"a continuation of {longest} tokens does not fit the model's {max_len}-token window")
    by_ctx: dict[tuple, list[int]] = {}
    for j, c in enumerate(conts):
        by_ctx.setdefault(tuple(ctx[-(max_len + 1 - len(c)) :]), []).append(j)
    return [(_Item(list(k), [conts[j] for j in js]), js) for k, js in by_ctx.items()]


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


def _passes(order: list[int], lengths: list[int], budget: int, overhead: float = PASS_OVERHEAD) -> list[list[int]]:
    """Split length-sorted (longest first) rows into passes of at most ``budget`` padded tokens each.

    A forward pass costs a fixed time (``overhead``, in units of one token's time: see :func:`pass_overhead`)
    plus a time per padded token, so a short dynamic programme picks the cut points that minimise the total;
    the result packs short rows many to a pass and keeps similar lengths together.
    """
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            width = lengths[order[i]]  # the longest row of order[i:j]
            if (j - i) * width > budget and j - i > 1:
                break
            c = best[i] + overhead + (j - i) * width
            if c < best[j]:
                best[j], cut[j] = c, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


_OVERHEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.inference_mode()
def pass_overhead(model) -> float:
    """The fixed cost of one forward pass in units of one token's cost, timed on this model (cached per model).

    Two tiny passes (4 and 68 tokens, best of three each) give time = fixed + per_token * tokens; the ratio is
    what the pass planner trades against padding (on a GPU, where a small pass leaves the device idle, it is
    much larger than on a CPU, so passes there pack more rows). Minimum times, as other load only adds time.
    """
    if model in _OVERHEAD:
        return _OVERHEAD[model]
    dev = model_device(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def best_of(n_tok: int, reps: int = 3) -> float:
        ids = torch.zeros((1, n_tok), dtype=torch.long, device=dev)  # any token: only the time counts
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    best_of(4, reps=1)  # warm-up: lazy initialisation and allocator
    small, large = best_of(4), best_of(68)
    per_token = max((large - small) / 64, 1e-9)
    _OVERHEAD[model] = value = float(min(max(small / per_token - 4, 1.0), 4096.0))
    return value


def _build_past(pasts: list[list[_Seg]]):
    """One right-padded cache for rows whose pasts are lists of segments; returns (cache or None, past mask)."""
    from transformers import DynamicCache

    lens = [sum(s.n for s in p) for p in pasts]
    width, b = max(lens), len(pasts)
    mask = torch.zeros((b, width), dtype=torch.long)
    for j, n in enumerate(lens):
        mask[j, :n] = 1
    if width == 0:
        return None, mask
    ref = next(s.kv for p in pasts for s in p if s.n)  # layer count, shapes and dtype
    layers = []
    for layer in range(len(ref)):
        kv = []
        for t in (0, 1):
            like = ref[layer][t]
            x = like.new_zeros((b, like.shape[1], width, like.shape[3]))
            for j, p in enumerate(pasts):
                at = 0
                for s in p:
                    x[j, :, at : at + s.n] = s.kv[layer][t][0, :, : s.n]
                    at += s.n
            kv.append(x)
        layers.append(tuple(kv))
    return DynamicCache(layers), mask


def _forward(model, rows: list[list[int]], pasts: list[list[_Seg]], pad: int, scored: torch.Tensor):
    """One pass: ``rows`` after their pasts; returns (cache, past width, final hidden states at the ``scored``
    flat indices); the vocabulary head runs on none (vocab_head)."""
    from transformers import DynamicCache

    ids, mask = _pad(rows, pad)
    cache, past_mask = _build_past(pasts)
    start = past_mask.sum(1, keepdim=True)
    positions = start + torch.arange(ids.shape[1]).unsqueeze(0)
    dev = model_device(model)
    with captured_hidden(model, scored) as got:
        out = model(
            input_ids=ids.to(dev),
            attention_mask=torch.cat([past_mask, mask], 1).to(dev),
            position_ids=positions.to(dev),
            past_key_values=cache if cache is not None else DynamicCache(),
            use_cache=True,
        )
    return out.past_key_values, past_mask.shape[1], got[0]


@torch.inference_mode()
def _prefix_cache(model, tokens: list[int], pad: int) -> _Seg:
    cache, _, _ = _forward(model, [tokens], [[]], pad, torch.empty(0, dtype=torch.long))
    return _Seg([(layer.keys, layer.values) for layer in cache.layers], len(tokens))


@torch.inference_mode()
def _run_context(
    model, rows: list[list[int]], pasts: list[list[_Seg]], pad: int, budget: int, overhead: float
) -> list[_Seg]:
    """KV of each row's tokens run after its past, in length-sorted passes of at most ``budget`` tokens."""
    out: list = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    for sub in _passes(order, [len(r) for r in rows], budget, overhead):
        cache, pw, _ = _forward(
            model, [rows[r] for r in sub], [pasts[r] for r in sub], pad, torch.empty(0, dtype=torch.long)
        )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        for j, r in enumerate(sub):
            n = len(rows[r])
            # clones: a view would keep the whole pass's cache (its padded pasts included) alive
            out[r] = _Seg(
                [(k[j : j + 1, :, pw : pw + n].clone(), v[j : j + 1, :, pw : pw + n].clone()) for k, v in kv], n
            )
    return out


def _families(items: list[_Item], groups: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Items as families [(leader, 0), (follower, shared tokens beyond the group prefix), ...].

    Contexts are sorted, so items that start alike are neighbours; a follower shares at least MIN_SIBLING
    cached tokens (everything but the last context token) with its leader beyond their common group prefix.
    """
    fams: list[list[tuple[int, int]]] = []
    for i in sorted(range(len(items)), key=lambda i: (items[i].group, items[i].ctx[:-1])):
        it, g = items[i], len(groups[items[i].group])
        if fams:
            lead = items[fams[-1][0][0]]
            m = _lcp(lead.ctx[:-1], it.ctx[:-1]) - g if lead.group == it.group else 0
            if m >= MIN_SIBLING:
                fams[-1].append((i, m))
                continue
        fams.append([(i, 0)])
    return fams


@torch.inference_mode()
def _context_segs(
    model, items: list[_Item], fams, gsegs: list[list[_Seg]], pad: int, budget: int, overhead: float
) -> list[list[_Seg]]:
    """Per item, its whole past as segments: group prefix + everything of its context but the last token.

    Leaders (and lone items) run their context after the group prefix; followers then run only their tail after
    the group prefix and the part of the leader's cache they share, unless all they share is worth less than
    the one more pass that takes.
    """
    glen = [sum(s.n for s in segs) for segs in gsegs]
    if sum(m for f in fams for _, m in f[1:]) < overhead:  # the tails' pass would cost more than it saves
        fams = [[(i, 0)] for f in fams for i, _ in f]
    own: dict[int, _Seg] = {}
    heads = [f[0][0] for f in fams if len(items[f[0][0]].ctx) - 1 > glen[items[f[0][0]].group]]
    runs = _run_context(
        model,
        [items[i].ctx[glen[items[i].group] : -1] for i in heads],
        [gsegs[items[i].group] for i in heads],
        pad,
        budget,
        overhead,
    )
    own.update(zip(heads, runs))
    tails, tail_pasts, shared = [], [], {}
    for fam in fams:
        for i, m in fam[1:]:
            shared[i] = _Seg(own[fam[0][0]].kv, m)
            g = glen[items[i].group]
            if len(items[i].ctx) - 1 > g + m:
                tails.append(i)
                tail_pasts.append(gsegs[items[i].group] + [shared[i]])
    runs = _run_context(
        model, [items[i].ctx[glen[items[i].group] + shared[i].n : -1] for i in tails], tail_pasts, pad, budget, overhead
    )
    own.update(zip(tails, runs))
    out = []
    for i, it in enumerate(items):
        segs = list(gsegs[it.group]) + ([shared[i]] if i in shared else []) + ([own[i]] if i in own else [])
        out.append(segs)
    return out


@torch.inference_mode()
def _score_choices(
    model, head: VocabHead, items: list[_Item], pasts: list[list[_Seg]], pad: int, budget: int, overhead: float
):
    """(loglik, is_greedy) per choice: rows [last context token] + continuation[:-1] after the item's past."""
    owner, slot, inputs = [], [], []
    for i, it in enumerate(items):
        for j, c in enumerate(it.conts):
            owner.append(i)
            slot.append(j)
            inputs.append([it.ctx[-1]] + c[:-1])  # logits then line up with the continuation tokens
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
    results: list[list] = [[None] * len(it.conts) for it in items]
    for sub in _passes(order, [len(x) for x in inputs], budget, overhead):
        width = max(len(inputs[r]) for r in sub)
        scored = torch.cat([j * width + torch.arange(len(inputs[r])) for j, r in enumerate(sub)])
        _, _, h = _forward(model, [inputs[r] for r in sub], [pasts[owner[r]] for r in sub], pad, scored)
        targets = torch.tensor([t for r in sub for t in items[owner[r]].conts[slot[r]]])
        nll, hit = head.nll(h, targets, greedy=True)
        tok_lp, hit = (-nll).tolist(), hit.tolist()
        at = 0
        for r in sub:
            n = len(inputs[r])
            results[owner[r]][slot[r]] = (sum(tok_lp[at : at + n]), all(hit[at : at + n]))
            at += n
    return results


def _group_prefixes(tokenizer, hints: list[str], items: list[_Item]) -> list[list[int]]:
    """Token prefixes shared by the items of one ``shared_prefix`` hint (one per item); sets their ``group``.

    The hint's own tokens can differ from the item's at the seam ("\\n\\n" + "Q" vs "\\n" "\\nQ"), so the
    common token prefix is used; items sharing too little, and hints of a single item, get no group.
    """
    by_hint: dict[str, list[int]] = {}
    for i, hint in enumerate(hints):
        if hint:
            by_hint.setdefault(hint, []).append(i)
    prefixes: list[list[int]] = [[]]
    for hint, idx in by_hint.items():
        ptoks = tokenizer.encode(hint, add_special_tokens=False)
        lcps = {i: min(_lcp(ptoks, items[i].ctx), len(items[i].ctx) - 1) for i in idx}
        good = [i for i in idx if lcps[i] >= MIN_SHARED]
        if len(good) < 2:
            continue
        prefixes.append(ptoks[: min(lcps[i] for i in good)])
        for i in good:
            items[i].group = len(prefixes) - 1
    return prefixes


def score(
    model, tokenizer, requests: Sequence[Request], batch_size: int = 8, progress: bool = False, desc: str = "scoring"
) -> list[list[tuple[float, bool]]]:
    """(loglik, is_greedy) for every continuation of every request, in order.

    ``batch_size`` sets the padded tokens per forward pass: as many as ``batch_size`` sequences of the naive
    method (context + continuation) on the same items; shorter rows (choices alone) are packed more per pass.
    Requests of several tasks given together are packed into the same passes.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    max_len = max_length(model)
    items, owner, slots, hints = [], [], [], []
    for ri, r in enumerate(requests):
        for it, js in _tokenize(tokenizer, r, max_len):
            items.append(it)
            owner.append(ri)
            slots.append(js)
            hints.append(r.shared_prefix)
    groups = _group_prefixes(tokenizer, hints, items)
    was_training = model.training
    model.eval()
    results: list[list] = [[None] * len(r.continuations) for r in requests]
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    try:
        overhead = pass_overhead(model)
        head = VocabHead(model)  # one logits buffer for every pass
        gsegs = [[]] + [[_prefix_cache(model, toks, pad)] for toks in groups[1:]]
        for chunk, fams in _chunks(items, groups, CHUNK_BATCHES * batch_size):
            sub = [items[i] for i in chunk]
            local = {i: k for k, i in enumerate(chunk)}
            fams = [[(local[i], m) for i, m in f] for f in fams]
            # a pass holds as many padded tokens as `batch_size` of the chunk's longest naive sequences
            budget = batch_size * max(_work(it, groups) for it in sub)
            pasts = _context_segs(model, sub, fams, gsegs, pad, budget, overhead)
            for i, o in zip(chunk, _score_choices(model, head, sub, pasts, pad, budget, overhead)):
                for j, x in zip(slots[i], o):
                    results[owner[i]][j] = x
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return results


def _work(it: _Item, groups: list[list[int]]) -> int:
    """Tokens an item runs beyond its group prefix: its context plus its longest continuation."""
    return len(it.ctx) - len(groups[it.group]) + max(len(c) for c in it.conts)


def _chunks(items: list[_Item], groups: list[list[int]], size: int):
    """Chunks of about ``size`` items, whole families each, longest work first (similar lengths together)."""
    fams = _families(items, groups)
    fams.sort(key=lambda f: -max(_work(items[i], groups) for i, _ in f))
    chunk: list[int] = []
    chunk_fams: list = []
    for f in fams:
        chunk.extend(i for i, _ in f)
        chunk_fams.append(f)
        if len(chunk) >= size:
            yield chunk, chunk_fams
            chunk, chunk_fams = [], []
    if chunk:
        yield chunk, chunk_fams


@torch.inference_mode()
def score_naive(
    model, tokenizer, requests: Sequence[Request], batch_size: int = 8, progress: bool = False
) -> list[list[tuple[float, bool]]]:
    """Reference: every (context, continuation) as its own full sequence, as lm-eval's HF backend does."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    max_len = max_length(model)
    flat = []  # (request index, continuation index, input tokens, continuation tokens), as lm-eval builds them
    for ri, r in enumerate(requests):
        for j, cont in enumerate(r.continuations):
            ctx, c = encode_pair(tokenizer, r.context, cont)
            flat.append((ri, j, ((ctx or [prefix_token_id(tokenizer)]) + c)[-(max_len + 1) :][:-1], c))
    results: list[list] = [[None] * len(r.continuations) for r in requests]
    order = sorted(range(len(flat)), key=lambda k: -len(flat[k][2]))  # lm-eval sorts by length, longest first
    model.eval()
    for s in tqdm(range(0, len(flat), batch_size), disable=not progress, desc="naive scoring"):
        ks = order[s : s + batch_size]
        chunk = [flat[k] for k in ks]
        ids, mask = _pad([c[2] for c in chunk], pad)
        dev = model_device(model)
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), dim=-1)
        for r, (ri, j, inp, cont) in enumerate(chunk):
            n = len(inp)
            lp = logp[r, n - len(cont) : n]
            t = torch.tensor(cont, device=logp.device)
            results[ri][j] = (lp.gather(1, t.unsqueeze(1)).sum().item(), bool((lp.argmax(-1) == t).all()))
    return results
