"""Batched, KV-cached text generation with per-sequence stop strings (for HumanEval, MBPP, GSM8K, MATH).

``generate(model, tokenizer, prompts, ...)`` returns, for every prompt, ``num_samples`` completions: the
decoded text after the prompt, cut at the first stop string. Greedy decoding with ``batch_size > 1`` on a
model whose cache is plain full attention runs continuous batching (continuous.py: ``batch_size`` rows decode
at once and a stopped row's slot takes the next prompt; shared few-shot prefixes are prefilled once). Every
other case drives HF ``model.generate`` (plain HF models and unmerged PeftModels both work) on left-padded
batches:

- prompts are tokenised one by one (the tokenizer's own special-token convention), sorted by length (longest
  first, so padding is small and memory trouble shows at once) and left-padded into batches sized by tokens:
  a batch holds as many (prompt + new tokens) as ``batch_size`` rows of the longest prompt, so short prompts
  run more rows at once (at most 4 x ``batch_size``; ``batch_size=1`` is one prompt at a time). The
  attention mask makes padding invisible, so greedy outputs equal one-at-a-time greedy generation (checked
  by tests and ``bench/generation.py``);
- the KV cache is preallocated for prompt + ``max_new_tokens`` (transformers' static cache), so a decoding
  step writes into it instead of copying the whole cache to append one position;
- stop strings end each row separately: a row is decoded only when its newest token can end a stop string
  (a per-tokenizer table, built once, of tokens containing a stop string's last character or not decodable
  alone), and then only its last few tokens; the batch ends when every row has stopped, hit EOS or
  ``max_new_tokens``; the text is then cut at the first stop string;
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

from collections.abc import Sequence
from functools import lru_cache

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..errors import LorascopeError
from . import continuous


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


@lru_cache(maxsize=8)
def _may_end_stop(tokenizer, stop: tuple[str, ...]) -> torch.Tensor:
    """Per token id: could this token, appended to a row, complete one of ``stop``? (False means surely not.)

    A stop string that appears when a token is appended ends inside that token's text, so the token holds the
    stop string's last character. A token's text is read after an anchor token (SentencePiece drops a leading
    space at the start of a decode); tokens that decode to nothing or to a replacement character (part of a
    UTF-8 sequence, or a special token) cannot be judged alone and are always checked.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    base = tokenizer.decode(anchor)
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([anchor + [t] for t in range(vocab)], skip_special_tokens=True)
    last = {s[-1] for s in stop}
    flags = [
        not x.startswith(base) or len(x) == len(base) or "\ufffd" in x or any(c in x[len(base) :] for c in last)
        for x in texts
    ]
    return torch.tensor(flags, dtype=torch.bool)


class RowStop:
    """Whether a stop string has appeared in one row's new tokens, called once per appended token: decodes
    only when the newest token can end a stop string (:func:`_may_end_stop`), and then only the last few."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        # a token is at least one byte; a few extra cover partial UTF-8 sequences
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 4
        self.may_end = _may_end_stop(tokenizer, tuple(sorted(set(self.stop)))) if self.stop else None

    def __call__(self, new_ids: list[int]) -> bool:
        if not self.stop:
            return False
        t = new_ids[-1]
        if t < len(self.may_end) and not self.may_end[t]:
            return False
        return self._hit(new_ids[-self.window :])

    def _hit(self, tail: list[int]) -> bool:
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in self.stop)


class StopOnText(RowStop, StoppingCriteria):
    """Per-row stop when a stop string appears in the text generated after column ``start``.

    Written here because HF's ``stop_strings`` rebuilds tables over the whole vocabulary on every
    ``generate`` call (seconds for a 49K vocabulary, per batch). Each step, only rows not yet stopped whose
    newest token can end a stop string (:func:`_may_end_stop`) are decoded, and only their last few tokens.
    ``ignore`` holds token ids that end a row anyway (EOS, padding): such rows are not decoded.
    """

    def __init__(self, tokenizer, stop: Sequence[str], start: int, ignore: Sequence[int] = ()):
        RowStop.__init__(self, tokenizer, stop)
        self.start = start
        self.ignore = torch.tensor(sorted(set(ignore)), dtype=torch.long)
        self.stopped: torch.Tensor | None = None
        self.seen = start  # columns already checked
        self.decoded_rows = 0  # rows decoded so far (what the table saves is visible in tests)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        width = input_ids.shape[1]
        if not self.stop or width <= self.start:
            return done
        if self.stopped is None:
            self.stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        check = ~self.stopped
        first = self.start  # a first call on several new tokens: every row, all of its new text
        if width == self.seen + 1:  # the usual step: one new token per row, the table says which can stop
            first = max(self.start, width - self.window)
            newest = input_ids[:, -1].cpu()
            in_vocab = newest < len(self.may_end)
            check &= ~torch.isin(newest, self.ignore)
            check &= ~in_vocab | self.may_end[newest.clamp(max=len(self.may_end) - 1)]
        self.seen = width
        rows = check.nonzero().flatten().tolist()
        if rows:
            tails = input_ids[rows, first:].tolist()
            self.decoded_rows += len(rows)
            for r, tail in zip(rows, tails):
                if self._hit(tail):
                    self.stopped[r] = done[r] = True
        return done


def _pad_id(tokenizer, model) -> int:
    for tid in (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise LorascopeError("tokenizer has neither a pad nor an EOS token; generation needs one for padding")


def _gen_config(
    model, tokenizer, max_new_tokens: int, temperature: float, top_p: float, pad: int, stop: Sequence[str]
) -> GenerationConfig:
    # A fresh config, so a model's sampling defaults (top_k=50, repetition penalty, ...) never leak in.
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    # static cache: preallocated for prompt + max_new_tokens, so a step writes one position instead of
    # concatenating (copying) the whole cache; models without static-cache support get their default cache
    kw = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        repetition_penalty=1.0,
        num_beams=1,
        cache_implementation="static",
    )
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**kw)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[str]]:
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
    rows = sorted(
        ((i, s) for i in range(len(prompts)) for s in range(copies)), key=lambda r: (-len(enc[r[0]]), r[0], r[1])
    )
    pad = _pad_id(tokenizer, model)
    cfg = _gen_config(model, tokenizer, max_new_tokens, temperature, top_p, pad, stop)
    eos = cfg.eos_token_id
    ends = {pad, *(eos if isinstance(eos, list) else [eos])} - {None}  # a finished row continues with pad
    out: list[list[str]] = [[""] * copies for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(rows), desc=desc, disable=not progress, leave=False) as bar:
            ids = [enc[i] for i, _ in rows]
            if greedy and batch_size > 1 and continuous.supports(model):
                new = continuous.greedy(
                    model,
                    ids,
                    slots=batch_size,
                    max_new_tokens=max_new_tokens,
                    ends=ends,
                    stopped=RowStop(tokenizer, stop),
                    on_done=lambda _: bar.update(1),
                )
            else:
                new = _in_batches(model, tokenizer, ids, cfg, stop, ends, batch_size, seed, bar)
        for toks, (i, s) in zip(new, rows):
            out[i][s] = truncate_at_stop(_continuation(tokenizer, enc[i], _until(toks, ends)), stop)
    finally:
        model.train(was_training)
    if copies < num_samples:
        out = [o * num_samples for o in out]
    return out


def _in_batches(
    model,
    tokenizer,
    ids: list[list[int]],
    cfg: GenerationConfig,
    stop: Sequence[str],
    ends: set,
    batch_size: int,
    seed: int,
    bar,
) -> list[list[int]]:
    """New token ids per prompt (sorted longest first) from ``model.generate`` on token-sized batches."""
    new: list[list[int]] = []
    for b, chunk in enumerate(_batches([len(x) for x in ids], batch_size, cfg.max_new_tokens)):
        new += _run_batch(model, tokenizer, [ids[k] for k in chunk], cfg, stop, ends, seed * 1_000_003 + b)
        bar.update(len(chunk))
    return new


def _batches(lengths: list[int], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Cut rows sorted longest first into batches of at most ``batch_size`` rows of the longest prompt's tokens.

    A batch's cache and activations grow with rows x (its longest prompt + new tokens); holding that product
    fixed lets short prompts run more rows at once. Rows are capped at 4 x ``batch_size`` (past that, a CPU
    gains little per step), and ``batch_size=1`` stays one prompt at a time.
    """
    if not lengths:
        return []
    budget = batch_size * (lengths[0] + max_new_tokens)
    cap = 1 if batch_size == 1 else 4 * batch_size
    out: list[list[int]] = [[]]
    for k in range(len(lengths)):
        cur = out[-1]
        if cur and (len(cur) == cap or (len(cur) + 1) * (lengths[cur[0]] + max_new_tokens) > budget):
            out.append(cur := [])
        cur.append(k)
    return out


def _run_batch(
    model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, stop: Sequence[str], ends: set, seed: int
) -> list[list[int]]:
    """New token ids of one left-padded batch (greedy or sampled under ``seed`` in a forked RNG)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    criteria = StoppingCriteriaList([StopOnText(tokenizer, stop, width, ignore=sorted(ends))])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg, stopping_criteria=criteria
        )
    return gen[:, width:].tolist()


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
        return whole[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)  # decoding changed the prompt's text
