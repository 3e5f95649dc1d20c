"""Token windows for scoring whole texts: sliding windows, token-budgeted batches, right padding.

Every token after the BOS stand-in is a target exactly once, with up to ``window`` tokens of left context, so
a text longer than the model's context is scored like lm-eval's rolling loglikelihood (stride = window / 2).
"""

from __future__ import annotations

import torch

from .engine import prefix_token_id


def windows(tokenizer, texts: list[str], window: int, stride: int) -> list[tuple[int, list[int], list[int], int]]:
    """Sliding windows: (text index, input tokens, target tokens, position of the first target); every token
    after the BOS stand-in is a target exactly once, with up to ``window`` tokens of left context. Positions
    count from 1 = the first token after BOS."""
    assert 0 < stride <= window
    rows = []
    for i, text in enumerate(texts):
        toks = [prefix_token_id(tokenizer)] + tokenizer.encode(text, add_special_tokens=False)
        for s in range(1, len(toks), stride):
            e = min(s + stride, len(toks))
            inp = toks[max(0, e - 1 - window): e - 1]
            rows.append((i, inp, toks[s:e], s))
    return rows


def batches(rows: list, budget: int):
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


def pad_batch(seqs: list[list[int]], pad: int):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
