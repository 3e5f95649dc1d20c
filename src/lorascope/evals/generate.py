"""Batched, KV-cached text generation with per-sequence stop strings (for HumanEval, MBPP, GSM8K, MATH).

``generate(model, tokenizer, prompts, ...)`` returns, for every prompt, ``num_samples`` completions: the
decoded text after the prompt, cut at the first stop string. It drives HF ``model.generate`` (so plain HF
models and unmerged PeftModels both work) on left-padded batches:

- prompts are tokenised one by one (the tokenizer's own special-token convention), sorted by length (longest
  first, so padding is small and memory trouble shows at once) and left-padded into batches of
  ``batch_size`` rows; the attention mask makes padding invisible, so greedy outputs equal one-at-a-time
  greedy generation (checked by tests and ``bench/generation.py``);
- stop strings end each row separately (a StoppingCriteria that decodes each row's newest tokens); the batch
  ends when every row has stopped, hit EOS or ``max_new_tokens``; the text is then cut at the first stop
  string;
- greedy when ``temperature == 0`` (and then one generation serves all ``num_samples``), otherwise sampling
  with temperature and nucleus ``top_p`` (no top-k), seeded per batch from ``seed`` in a forked RNG, so the
  same seed, prompts and batch size give the same samples and the global RNG is left alone;
- the completion text is ``decode(prompt + new)[len(decode(prompt)):]``: decoding new tokens alone drops the
  leading space of SentencePiece tokenizers.

Example::

    >>> from lorascope.evals.generate import generate
    >>> outs = generate(model, tok, ["Question: 2+3?\\nAnswer:"], max_new_tokens=32, stop=["\\n\\n"])
    >>> outs[0][0]          # e.g. " 5"
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..errors import LorascopeError


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


class StopOnText(StoppingCriteria):
    """Per-row stop when a stop string appears in the text generated after column ``start``.

    Written here because HF's ``stop_strings`` rebuilds tables over the whole vocabulary on every
    ``generate`` call (seconds for a 49K vocabulary, per batch); decoding the last few tokens of each row is
    exact and takes microseconds.
    """

    def __init__(self, tokenizer, stop: Sequence[str], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, [s for s in stop if s], start
        # a token is at least one byte; a few extra cover partial UTF-8 sequences
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done
        tails = input_ids[:, max(self.start, input_ids.shape[1] - self.window):].tolist()
        for r, tail in enumerate(tails):
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done[r] = any(s in text for s in self.stop)
        return done


def _pad_id(tokenizer, model) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id,
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise LorascopeError("tokenizer has neither a pad nor an EOS token; generation needs one for padding")


def _gen_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float, pad: int,
                stop: Sequence[str]) -> GenerationConfig:
    # A fresh config, so a model's sampling defaults (top_k=50, repetition penalty, ...) never leak in.
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
              repetition_penalty=1.0, num_beams=1)
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**kw)


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256,
             stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1,
             batch_size: int = 8, seed: int = 0, progress: bool = True,
             desc: str = "generate") -> list[list[str]]:
    """For each prompt, ``num_samples`` completions (text after the prompt, cut at the first stop string)."""
    if max_new_tokens < 1:
        raise LorascopeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise LorascopeError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 1:
        raise LorascopeError(f"samples must be >= 1, got {num_samples}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LorascopeError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    greedy = temperature == 0
    copies = 1 if greedy else num_samples
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    # one row per (prompt, sample); longest first
    rows = sorted(((i, s) for i in range(len(prompts)) for s in range(copies)),
                  key=lambda r: (-len(enc[r[0]]), r[0], r[1]))
    pad = _pad_id(tokenizer, model)
    cfg = _gen_config(model, tokenizer, max_new_tokens, temperature, top_p, pad, stop)
    eos = cfg.eos_token_id
    ends = {pad, *(eos if isinstance(eos, list) else [eos])} - {None}  # a finished row continues with pad
    device = next(model.parameters()).device
    out: list[list[str]] = [[""] * copies for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(rows), desc=desc, disable=not progress, leave=False) as bar:
            for b, start in enumerate(range(0, len(rows), batch_size)):
                chunk = rows[start:start + batch_size]
                width = max(len(enc[i]) for i, _ in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (i, _) in enumerate(chunk):
                    n = len(enc[i])
                    ids[r, width - n:] = torch.tensor(enc[i], dtype=torch.long)
                    mask[r, width - n:] = 1
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed * 1_000_003 + b)
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=cfg,
                                         stopping_criteria=StoppingCriteriaList([StopOnText(tokenizer, stop, width)]))
                new = gen[:, width:].tolist()
                for r, (i, s) in enumerate(chunk):
                    toks = _until(new[r], ends)
                    out[i][s] = truncate_at_stop(_continuation(tokenizer, enc[i], toks), stop)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    if copies < num_samples:
        out = [o * num_samples for o in out]
    return out


def _until(ids: list[int], ends: set) -> list[int]:
    for j, t in enumerate(ids):
        if t in ends:
            return ids[:j]
    return ids


def _continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text the new tokens add after the prompt (special tokens such as EOS dropped)."""
    if not new_ids:
        return ""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)  # decoding changed the prompt's text
