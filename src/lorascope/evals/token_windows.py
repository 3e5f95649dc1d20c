"""Token windows for scoring whole texts: sliding windows, packed into sequences, token-budgeted batches.

Every token after the BOS stand-in is a target exactly once, with up to ``window`` tokens of left context, so
a text longer than the model's context is scored like lm-eval's rolling loglikelihood (stride = window / 2).

Packing: the scored texts are short (~70 tokens on average for the English pool), so rows are packed several
to a sequence of PACK_WIDTH tokens with positions restarting per row and a block-diagonal causal mask: no row
attends to another, so what is measured does not change (tested against rows scored alone). The attention
mask is dense, so a wider sequence pays attention FLOPs for masked pairs; measured on the embedded model
(CPU time, one run, forward passes over 2k KL tokens): packed into 256 tokens 1.10x the padded per-row
batches, into 1024 only 1.02x.
"""

from __future__ import annotations

import contextlib

import torch

from .engine import model_device, output_head, prefix_token_id

PACK_WIDTH = 256  # tokens per packed sequence: short texts share one, attention stays cheap (see module doc)


def windows(tokenizer, texts: list[str], window: int, stride: int) -> list[tuple[int, list[int], list[int], int]]:
    """Sliding windows: (text index, input tokens, target tokens, position of the first target); every token
    after the BOS stand-in is a target exactly once, with up to ``window`` tokens of left context: the targets
    of a segment of ``stride`` tokens see the ``window`` tokens before the segment's end. Positions count from
    1 = the first token after BOS."""
    assert 0 < stride <= window
    rows = []
    for i, text in enumerate(texts):
        toks = [prefix_token_id(tokenizer)] + tokenizer.encode(text, add_special_tokens=False)
        # The stride segments that end within window + 1 tokens all take their context from the text's start,
        # so each one's input is a prefix of the last one's: they are one segment, with the same context for
        # every target (a text of 868 tokens at window 1024: 868 input tokens instead of 512 + 868).
        first = min(1 + stride * (window // stride), len(toks))
        starts = [1, *range(first, len(toks), stride)] if first > 1 else []
        for s, e in zip(starts, starts[1:] + [len(toks)]):
            rows.append((i, toks[max(0, e - 1 - window) : e - 1], toks[s:e], s))
    return rows


def pack_width(model) -> int:
    """PACK_WIDTH where the attention kernel takes a 4D additive mask as given (eager, SDPA), else 0: one row
    per sequence (flash attention kernels take no such mask)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    return PACK_WIDTH if impl in ("eager", "sdpa") else 0


def packed_batches(rows: list, budget: int, width: int = PACK_WIDTH) -> list[list[list[int]]]:
    """Rows packed into sequences of at most ``width`` tokens (a longer row alone), first fit, longest first;
    sequences grouped into batches of at most ``budget`` padded tokens (logits are vocab-sized).
    Returns batches of sequences of row indices."""
    seqs: list[list[int]] = []
    room: list[int] = []
    for r in sorted(range(len(rows)), key=lambda r: -len(rows[r][1])):
        n = len(rows[r][1])
        k = next((k for k, free in enumerate(room) if free >= n), None)
        if k is None:
            seqs.append([])
            room.append(max(width, n))
            k = len(seqs) - 1
        seqs[k].append(r)
        room[k] -= n
    used = [sum(len(rows[r][1]) for r in sq) for sq in seqs]
    out: list[list[list[int]]] = []
    widest = 0
    for k in sorted(range(len(seqs)), key=lambda k: -used[k]):  # fullest first: similar widths share a batch
        if not out or (len(out[-1]) + 1) * widest > budget:
            out.append([])
            widest = used[k]
        out[-1].append(seqs[k])
    return out


def batch_width(rows: list, seqs: list[list[int]]) -> int:
    """The longest packed sequence of a batch: every sequence is padded to it."""
    return max(sum(len(rows[r][1]) for r in s) for s in seqs)


def padded_tokens(rows: list, seqs: list[list[int]]) -> int:
    """Positions of one batch as target_logits lays it out: sequences x the longest sequence."""
    return len(seqs) * batch_width(rows, seqs)


def largest_batch(rows: list, plan: list[list[list[int]]]) -> int:
    """The most positions any batch of ``plan`` (packed_batches) lays out: what reused_head_output holds."""
    return max((padded_tokens(rows, b) for b in plan), default=0)


@contextlib.contextmanager
def reused_head_output(model, positions: int):
    """While open, a plain ``nn.Linear`` output head writes its logits into one buffer of ``positions`` rows
    (largest_batch of the plan), allocated once for every batch.

    The logits of a batch are (tokens x vocabulary): ~340 MB at 2k tokens and a 49k vocabulary, a fresh block
    each batch whose pages the kernel must fault in again. Measured on the 2-core machine: 400 MB written into
    fresh memory took 4.3-5.0 s through mimalloc's 2 MiB pages (0.2-0.3 s through glibc), 0.02-0.06 s when
    reused; an eval job of ``quick`` (held-out BPB + KL, one thread) took 201 / 191 s against 221 / 205 s
    before, alternated, with identical results. The logits a batch returns are views into the buffer,
    overwritten by the next batch: target_logits' callers consume them first. Same arithmetic as the module's
    own forward (one mm over the flattened rows, then the bias). Heads of another type (LoRA-wrapped,
    quantised) and batches larger than the buffer take the module's own path."""
    head = output_head(model)
    if positions <= 0 or type(head) is not torch.nn.Linear or "forward" in vars(head):
        yield
        return
    w = head.weight
    buf = torch.empty(positions, w.shape[0], dtype=w.dtype, device=w.device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > positions or x.dtype != w.dtype:
            return torch.nn.Linear.forward(head, x)
        out = buf[:rows]
        torch.mm(x.reshape(rows, -1), w.t(), out=out)
        if head.bias is not None:
            out += head.bias
        return out.view(*x.shape[:-1], w.shape[0])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


@torch.inference_mode()
def target_logits(model, rows: list, seqs: list[list[int]], pad: int) -> dict[int, torch.Tensor]:
    """Logits at each row's target positions, the rows packed into the sequences ``seqs``. Positions restart at
    0 for every row and a block-diagonal causal mask keeps rows from seeing each other, so each row is scored
    as if alone (same tokens, positions and context; only float rounding differs, ~1e-5 in log-probabilities)."""
    width = batch_width(rows, seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    pos, doc = torch.zeros_like(ids), torch.full_like(ids, -1)
    spans = []
    for j, s in enumerate(seqs):
        o = 0
        for k, r in enumerate(s):
            inp, n = rows[r][1], len(rows[r][1])
            ids[j, o : o + n], pos[j, o : o + n], doc[j, o : o + n] = torch.tensor(inp), torch.arange(n), k
            spans.append((r, j, o + n - len(rows[r][2]), o + n))
            o += n
    dev = model_device(model)
    if all(len(s) == 1 for s in seqs):  # nothing packed: a plain padding mask, which every attention kernel takes
        out = model(input_ids=ids.to(dev), attention_mask=(doc >= 0).long().to(dev), use_cache=False).logits
        return {r: out[j, a:b] for r, j, a, b in spans}
    allowed = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & torch.ones(width, width).tril().bool()
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding position sees itself: no all-masked row (NaN)
    dtype = next(model.parameters()).dtype
    # additive float mask: eager attention adds it, SDPA takes it; a 4D mask is used as given by transformers
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    logits = model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    return {r: logits[j, a:b] for r, j, a, b in spans}


# Positions per chunk of a vocabulary-wide temporary: at 16 MiB or less, glibc serves it from the heap and reuses
# it (larger blocks are fresh mmaps, paid in page faults on every call). One KL batch of 1,024 positions, CPU
# time on the embedded model, 3 repetitions while another study shared the cores: 0.49 s whole, 0.14 s in
# chunks, same values (kl_cache.kl_rows).
CHUNK_BYTES = 16 << 20


def row_chunks(n: int, vocab: int):
    """Slices of ``n`` positions whose float32 rows over ``vocab`` fit CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def target_nll(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Negative log-likelihood of each target under (positions, vocab) logits, in chunks (see CHUNK_BYTES)."""
    tgt = torch.tensor(targets, device=logits.device)[:, None]
    out = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
    for c in row_chunks(*logits.shape):
        x = logits[c].float()
        out[c] = torch.logsumexp(x, dim=-1) - x.gather(1, tgt[c])[:, 0]
    return out


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
