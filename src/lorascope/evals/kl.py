"""KL(reference || model) per token on English text: the forgetting proxy closest to the base model's behaviour.

``kl_base``: the reference is ctx.reference_model (the base model); metric ``kl`` in nats per token.

Example::

    >>> kl_sum, ntok = kl_per_text(tuned, base, tok, ["The cat sat on the mat."])[0]
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..errors import LorascopeError
from .base import EvalContext, TaskResult
from .engine import max_length, model_device
from .results import mean_stderr
from .texts import english_texts
from .token_windows import batches, pad_batch, pad_id, windows


@torch.inference_mode()
def kl_per_text(model, reference, tokenizer, texts: list[str], window: int | None = None,
                token_budget: int = 1024, progress: bool = False) -> list[tuple[float, int]]:
    """(sum over tokens of KL(reference || model) in nats, tokens) per text, same windows as text_nll."""
    window = min(window or 1024, max_length(model))
    rows = windows(tokenizer, texts, window, window // 2)
    pad = pad_id(tokenizer)
    out = [[0.0, 0] for _ in texts]
    if reference is model:  # the base against itself: KL is exactly 0, no forward pass needed
        for i, _, tgt in rows:
            out[i][1] += len(tgt)
        return [(a, n) for a, n in out]
    model.eval()
    reference.eval()
    for b in tqdm(list(batches(rows, token_budget)), desc="kl_base", disable=not progress, dynamic_ncols=True):
        ids, mask = pad_batch([rows[r][1] for r in b], pad)
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
