"""Tokenize documents and pack them into fixed-length training rows.

CPT: documents joined by EOS into one stream, cut into full seq_len rows (no padding; the < seq_len remainder is
dropped); labels = input_ids (the model shifts). When the tokenizer puts BOS first by default (Gemma, Llama 2/3,
Mistral), each row is BOS + seq_len-1 stream tokens: such models are conditioned on that first token (Gemma 3 270M's
loss on a code window rises from 2.8 to 4.6 nats/token without it), so rows without it would train the model on
inputs it never sees at evaluation, where every text starts with BOS. IFT: each pair rendered with the tokenizer's
chat template (user = prompt, assistant = response); labels are -100 on the prompt, so the loss is on the response
including its end-of-turn token; whole examples are packed greedily (next-fit, in order) into seq_len rows, an
example longer than seq_len is truncated, and only the tail of a row is padding (attention 0, labels -100). Packed
examples attend to earlier ones in the row, as TRL's default packing does; the loss masks keep the objective per
response. Tokenizers without a chat template get a plain "### Instruction / ### Response" format (``ift_format``
says which was used; the manifest records it).

    tokens, labels, lengths = tokenize_docs(docs, tokenizer, "ift")
    ds = pack_examples(tokens, labels, lengths, seq_len=512, pad_id=0)
    ds[0] -> {"input_ids": LongTensor[512], "labels": ..., "attention_mask": ...}
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..errors import LorascopeError

PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"
BATCH = 256


def ift_format(tokenizer) -> str:
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "plain: " + PLAIN_PROMPT


def _messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def render_pair(tokenizer, ex: dict) -> tuple[str, str]:
    """(prompt text, response text): their concatenation is the rendered conversation, split at the point
    where the assistant's content starts (so the mask boundary is exact)."""
    if not getattr(tokenizer, "chat_template", None):
        bos = tokenizer.bos_token or ""
        return bos + PLAIN_PROMPT.format(prompt=_messages(ex["prompt"])[-1]["content"]), ex["response"] + (
            tokenizer.eos_token or ""
        )
    msgs = _messages(ex["prompt"])
    p_text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ex["response"]}], tokenize=False)
    if not full.startswith(p_text):
        raise LorascopeError(
            "tokenizer chat template: the rendered prompt is not a prefix of prompt+response, "
            "so the response cannot be masked exactly"
        )
    return p_text, full[len(p_text) :]


def _batched_ids(tokenizer, texts: list[str], desc: str) -> list[list[int]]:
    out: list[list[int]] = []
    for i in tqdm(range(0, len(texts), BATCH), desc=desc, unit="batch", leave=False, disable=len(texts) < 4 * BATCH):
        out += tokenizer(texts[i : i + BATCH], add_special_tokens=False)["input_ids"]
    return out


def tokenize_docs(docs: list, tokenizer, regime: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat (tokens, labels, per-document lengths) arrays; CPT documents end with EOS."""
    if not docs:
        z = np.zeros(0, np.int32)
        return z, z, np.zeros(0, np.int64)
    if regime == "cpt":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise LorascopeError("tokenizer has no EOS token to separate CPT documents")
        ids = _batched_ids(tokenizer, docs, "tokenizing")
        toks = [np.asarray(x + [eos], dtype=np.int32) for x in ids]
        tokens = np.concatenate(toks)
        return tokens, tokens, np.asarray([len(t) for t in toks], np.int64)
    pairs = [render_pair(tokenizer, ex) for ex in docs]
    p_ids = _batched_ids(tokenizer, [p for p, _ in pairs], "tokenizing prompts")
    r_ids = _batched_ids(tokenizer, [r for _, r in pairs], "tokenizing responses")
    toks, labs = [], []
    for p, r in zip(p_ids, r_ids):
        toks.append(np.asarray(p + r, dtype=np.int32))
        labs.append(np.asarray([-100] * len(p) + r, dtype=np.int32))
    return np.concatenate(toks), np.concatenate(labs), np.asarray([len(t) for t in toks], np.int64)


def row_prefix(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every encoded text with it by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length rows of input_ids / labels / attention_mask (numpy storage, LongTensor items). With
    ``prefix``, each stored row gets that token in front when read (so CPT rows stay views of the stream)."""

    def __init__(
        self, input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray, prefix: int | None = None
    ):
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.input_ids)

    def _row(self, a: np.ndarray, i: int) -> torch.Tensor:
        r = a[i].astype(np.int64)
        return torch.from_numpy(r if self.prefix is None else np.concatenate(([self.prefix], r)))

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self._row(self.input_ids, i),
            "labels": self._row(self.labels, i),
            "attention_mask": torch.from_numpy(self.attention_mask[i].astype(np.int64)),
        }


def pack_stream(tokens: np.ndarray, seq_len: int, bos: int | None = None) -> PackedDataset:
    """CPT rows: consecutive slices of the stream (views, no copy), seq_len long, or seq_len-1 after ``bos``;
    labels = input_ids (a row's first token is never a target: the model shifts)."""
    body = seq_len if bos is None else seq_len - 1
    n = len(tokens) // body
    rows = tokens[: n * body].reshape(n, body)
    return PackedDataset(rows, rows, np.broadcast_to(np.ones(seq_len, np.int32), (n, seq_len)), prefix=bos)


def pack_examples(
    tokens: np.ndarray, labels: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int
) -> PackedDataset:
    """IFT rows: whole examples packed next-fit in order; examples left with no response token are skipped."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    rows: list[list[tuple[int, int]]] = []  # (start, length) spans per row
    used = seq_len
    for s, n in zip(starts.tolist(), lengths.tolist()):
        n = min(n, seq_len)
        if not (labels[s : s + n] != -100).any():
            continue  # a prompt longer than seq_len: nothing to learn from this example
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((s, n))
        used += n
    ids = np.full((len(rows), seq_len), pad_id, np.int32)
    lab = np.full((len(rows), seq_len), -100, np.int32)
    mask = np.zeros((len(rows), seq_len), np.int32)
    for r, spans in enumerate(rows):
        o = 0
        for s, n in spans:
            ids[r, o : o + n], lab[r, o : o + n], mask[r, o : o + n] = tokens[s : s + n], labels[s : s + n], 1
            o += n
    return PackedDataset(ids, lab, mask)
