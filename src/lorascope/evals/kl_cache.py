"""The base model's side of KL(base || tuned), computed once per base model and text set, then memory-mapped.

KL(p || q) at one position needs the whole base distribution p, but not stored as such: what is stored per
scored position (in the order token_windows.windows yields them) is, in float64,

- ``h``: the base model's final hidden state (what its head reads), from which the base logits are exact again
  through the base's head: ``hidden`` numbers instead of ``vocabulary``;
- ``s = W^T p``: the base distribution's expected output embedding, and ``ent = sum p log p``.

With a tuned model whose head is the base's (LoRA and the other adapters that leave ``lm_head`` alone: the
head's weight is compared), KL = ent - p.z + logsumexp(z) where z = W h' is the tuned logits and p.z = s.h', so
one pass of the tuned model, its logits reduced chunk by chunk, gives the KL with no base computation at all.
With another head (full fine-tuning, a tied embedding that moved) the base logits are recomputed from ``h``
through the base's head, chunk by chunk beside the tuned ones: one more head matmul per token, no base body.

Disk: (2 x hidden + 1) x 8 bytes per scored token: 9.2 KB for the embedded model (was 96 KiB as float16
log-probabilities over 49,152 tokens), 92 MB per 10k tokens (was 0.98 GB); 10.3 KB for Gemma 3 270M (was 512 KiB).

Exactness: both paths are the two-pass KL's arithmetic up to float rounding (no truncation of p anywhere);
tested within 1e-3 relative of the two-pass KL (tests/test_kl_cache.py: the tiny model, and the embedded model
as an integration test, both paths). Measured (bench/eval_throughput.py, ~1.1k tokens, weights moved by 1% of
their spread): with a moved head the same arithmetic as two passes (difference 0); with the base's head 2.9e-5
relative on the embedded model (worst text 7.2e-5), 1.4e-4 on Gemma 3 270M (worst text 2.3e-4): the one-pass
formula subtracts numbers of ~10 nats to get ~0.005, so fp32 rounding of the tuned logits shows.

The key is a hash of what determines the numbers, not of names: the model's config (less the path it was read
from), a fingerprint of its weights (shape, dtype, float64 sum and a strided sample of every tensor: cheap, and a
change anywhere in a tensor moves its sum), and the exact token rows scored (tokenizer, texts, token count and
window all end up in them). A file is written beside its target and renamed, under a lock, so parallel jobs
asking for the same base build it once.

Example::

    >>> side = base_side(base, rows, pad=2)      # (scored positions, 2 x hidden + 1) float64, memory-mapped
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..assets import cache_dir, cache_lock
from ..errors import LorascopeError
from ..fileio import atomic_path
from .token_windows import pack_width, packed_batches, target_hidden
from .vocab_head import VocabHead

FORMAT = 2  # bump when what is stored (or how positions are ordered) changes
_SAMPLE = 4096  # elements hashed per tensor
# Below this size a second forward pass costs less than building and reading the file (a test's tiny model);
# the embedded model has 135M.
CACHE_MIN_PARAMS = 20_000_000


def worth_caching(model) -> bool:
    return sum(p.numel() for p in model.parameters()) >= CACHE_MIN_PARAMS


def weights_fingerprint(model) -> str:
    """sha256 over every tensor's name, shape, dtype, float64 sum and a strided sample of its values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{flat.double().sum().item():.17g}|".encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(model, rows: list) -> str:
    h = hashlib.sha256(f"kl-base-v{FORMAT}".encode())
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)  # where the weights were read from: one model converted under two cache dirs
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(weights_fingerprint(model).encode())
    for _, inp, tgt, _ in rows:
        h.update(np.asarray(inp, dtype=np.int64).tobytes() + b"|" + np.asarray(tgt, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def row_offsets(rows: list) -> list[int]:
    """Start of each row's scored positions in the cache array (rows in windows() order)."""
    out, n = [], 0
    for _, _, tgt, _ in rows:
        out.append(n)
        n += len(tgt)
    return out + [n]


def base_side(reference, rows: list, pad: int, token_budget: int = 1024, progress: bool = False) -> np.ndarray:
    """(scored positions, 2 x hidden + 1) float64 [h | W^T p | sum p log p] of ``reference`` over ``rows``
    (module doc): built once, then read."""
    path = cache_dir() / "kl-base" / f"{cache_key(reference, rows)}.npy"
    with cache_lock(path):  # parallel jobs: one builds, the others wait and read
        if not path.exists():
            _build(reference, rows, pad, token_budget, path, progress)
    return np.load(path, mmap_mode="r")


@torch.no_grad()
def _build(reference, rows: list, pad: int, token_budget: int, path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    off = row_offsets(rows)
    head = VocabHead(reference)
    width = 2 * int(head.weight.shape[1]) + 1
    need = off[-1] * width * 8
    free = shutil.disk_usage(path.parent).free
    if need > free * 0.9:
        raise LorascopeError(
            f"{path.parent}: kl_base's base-model cache needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free (set LORASCOPE_CACHE elsewhere or ask for fewer tokens)"
        )
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(off[-1], width))
        reference.eval()
        w64 = head.weight.detach().double()
        for seqs in tqdm(
            packed_batches(rows, token_budget, pack_width(reference)),
            desc="kl_base (base, cached)",
            disable=not progress,
            dynamic_ncols=True,
        ):
            h, spans = target_hidden(reference, rows, seqs, pad)
            side = torch.empty(h.shape[0], width, dtype=torch.float64)
            side[:, : h.shape[1]] = h
            for c, z in head.chunks(h):
                lp = torch.log_softmax(z.double(), dim=-1)
                p = lp.exp()
                side[c, h.shape[1] : -1] = (p @ w64.to(p.device)).cpu()
                side[c, -1] = (p * lp).sum(-1).cpu()
            for r, c in spans.items():
                arr[off[r] : off[r + 1]] = side[c].numpy()
        arr.flush()
        del arr


# Positions per chunk of a vocabulary-wide temporary in kl_rows: at 16 MiB or less, glibc serves it from the heap
# and reuses it (larger blocks are fresh mmaps, paid in page faults on every call). One KL batch of 1,024
# positions, CPU time on the embedded model, 3 repetitions while another study shared the cores: 0.49 s whole,
# 0.14 s in chunks, same values.
CHUNK_BYTES = 16 << 20


def row_chunks(n: int, vocab: int):
    """Slices of ``n`` positions whose float32 rows over ``vocab`` fit CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from both sides' logits at the same positions, in chunks of CHUNK_BYTES."""
    out = torch.empty(q_logits.shape[0], dtype=torch.float32, device=q_logits.device)
    for c in row_chunks(*q_logits.shape):
        lp = torch.log_softmax(p_logits[c].to(q_logits.device).float(), dim=-1)
        lq = torch.log_softmax(q_logits[c].float(), dim=-1)
        out[c] = (lp.exp() * (lp - lq)).sum(-1)
    return out


@torch.no_grad()
def kl_same_head(side: torch.Tensor, h_q: torch.Tensor, head: VocabHead) -> torch.Tensor:
    """KL(p || q) per position where q's head is p's: ent - s.h' + logsumexp(W h') (module doc), float64."""
    d = h_q.shape[1]
    lse = head.reduce(h_q)[0].double().cpu()
    cross = (side[:, d:-1] * h_q.double().cpu()).sum(-1)
    return side[:, -1] + lse - cross
