"""The base model's side of KL(base || tuned), computed once per base model and text set, then memory-mapped.

KL(p || q) at one position needs the whole base distribution p, so the cache holds, for every scored position
(in the order token_windows.windows yields them), the base model's log-softmax over the vocabulary in float16.
Disk cost: 2 bytes x vocabulary per scored token; for the embedded model (49,152 tokens) 96 KiB per token,
about 0.98 GB per 10k tokens (the default ``kl_base``), 0.2 GB for ``kl_base:2000``. Every later checkpoint then
runs one forward pass (the tuned model's) instead of two.

Exactness: float16 rounds each log-probability by at most 2^-11 of its size, so the most probable tokens (log p
near 0), which carry the KL, keep nearly all their precision; only tokens with p < e^-8 lose more than 0.004
nats, weighted by p. The stored row is renormalised (log_softmax again) before use, so p stays a distribution
and KL >= 0. Tested tolerance: the KL from the cache is within 1e-4 nats per token of the two-pass KL (tests/
test_kl_cache.py; the tiny model's worst text differs by 4e-6). Measured on the embedded model (2k tokens, a
LoRA checkpoint with KL 1.2e-4): 4e-7 nats per token overall, 1.5e-6 for the worst text.

The key is a hash of what determines the numbers, not of names: the model's config (less the path it was read
from), a fingerprint of its weights (shape, dtype, float64 sum and a strided sample of every tensor: cheap, and a
change anywhere in a tensor moves its sum), and the exact token rows scored (tokenizer, texts, token count and
window all end up in them). A file is written beside its target and renamed, under a lock, so parallel jobs
asking for the same base build it once.

Example::

    >>> lp = base_logprobs(base, rows, pad=2)      # (scored positions, vocab) float16, memory-mapped
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
from .token_windows import largest_batch, pack_width, packed_batches, reused_head_output, row_chunks, target_logits

FORMAT = 1  # bump when what is stored (or how positions are ordered) changes
_SAMPLE = 4096  # elements hashed per tensor
# Below this size a forward pass costs about what writing and reading 2 bytes x vocab per token does (a test's
# tiny model would write 1 GB to skip a one-second pass); the embedded model has 135M.
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


def log_probs_f16(logits: torch.Tensor) -> np.ndarray:
    """float16 log-softmax of (positions, vocab) logits, computed chunk by chunk."""
    out = np.empty(tuple(logits.shape), dtype=np.float16)
    for c in row_chunks(*logits.shape):
        out[c] = torch.log_softmax(logits[c].float(), dim=-1).to(torch.float16).cpu().numpy()
    return out


def base_logprobs(reference, rows: list, pad: int, token_budget: int = 1024, progress: bool = False) -> np.ndarray:
    """(scored positions, vocab) float16 log-softmax of ``reference`` over ``rows``: built once, then read."""
    path = cache_dir() / "kl-base" / f"{cache_key(reference, rows)}.npy"
    with cache_lock(path):  # parallel jobs: one builds, the others wait and read
        if not path.exists():
            _build(reference, rows, pad, token_budget, path, progress)
    return np.load(path, mmap_mode="r")


def _build(reference, rows: list, pad: int, token_budget: int, path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    off = row_offsets(rows)
    vocab = int(reference.get_output_embeddings().weight.shape[0])
    need = off[-1] * vocab * 2
    free = shutil.disk_usage(path.parent).free
    if need > free * 0.9:
        raise LorascopeError(
            f"{path.parent}: kl_base's base-model cache needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free (set LORASCOPE_CACHE elsewhere or ask for fewer tokens)"
        )
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(off[-1], vocab))
        reference.eval()
        plan = packed_batches(rows, token_budget, pack_width(reference))
        with reused_head_output(reference, largest_batch(rows, plan)):
            for seqs in tqdm(plan, desc="kl_base (base, cached)", disable=not progress, dynamic_ncols=True):
                for r, lg in target_logits(reference, rows, seqs, pad).items():
                    arr[off[r] : off[r + 1]] = log_probs_f16(lg)
        arr.flush()
        del arr


def kl_rows(p, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, in chunks: ``p`` is the reference's float16 log-probs from the cache (numpy,
    renormalised here) or its logits (tensor); ``q_logits`` the model's logits at the same positions."""
    out = torch.empty(q_logits.shape[0], dtype=torch.float32, device=q_logits.device)
    for c in row_chunks(*q_logits.shape):
        # the float16 rows are copied as they are and widened by torch: numpy's float16 -> float32 cast runs
        # element by element (4.3 s vs 0.06 s for 1,024 positions x 262k vocabulary, measured); both exact
        pc = torch.from_numpy(np.array(p[c])) if isinstance(p, np.ndarray) else p[c]
        lp = torch.log_softmax(pc.to(q_logits.device).float(), dim=-1)
        lq = torch.log_softmax(q_logits[c].float(), dim=-1)
        out[c] = (lp.exp() * (lp - lq)).sum(-1)
    return out
