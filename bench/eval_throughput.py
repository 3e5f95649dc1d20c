"""Scoring throughput: the vocabulary head in chunks (today's lorascope) against the whole-logits path before it.

Both paths score the same English texts (text_nll's packed windows, the held-out-BPB arithmetic) on the same
model in one process, alternated round by round; time is this process's CPU time (the machine may be shared:
wall time would measure the neighbours), and MFU is the linear layers' matmul FLOPs (body at every input
position, head at every scored one; attention not counted, so a lower bound) over a one-thread-per-core fp32
matmul peak measured in the same run. The old path: the model's own head over every position of a batch into
one reused (positions x vocabulary) buffer, then the NLL in 16 MiB chunks.

Then the KL (kl_base) on the same texts against a copy with its weights moved by 1% of their spread: the
two-pass KL, and the cached one (one build, then a timed checkpoint), for a tuned head and for the base's own
head (LoRA's case); relative differences printed.

    python bench/eval_throughput.py [--model embedded|PATH.gguf|...] [--tokens 2000] [--rounds 2] [--no-kl]
        [--chunk-mib 64]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from lorascope.evals import kl_cache, vocab_head
from lorascope.evals.bpb import text_nll
from lorascope.evals.kl import kl_per_text, select_texts
from lorascope.evals.token_windows import batch_width, pack_width, packed_batches, pad_id, windows
from lorascope.models import load_base

OLD_CHUNK = 16 << 20


def matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n x n matmul over ``reps``, by process CPU time per thread."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.process_time() - t) / 4)
    return 2 * n**3 / best / 1e9  # CPU seconds: per thread, whatever the thread count


@torch.inference_mode()
def old_text_nll(model, tok, texts: list[str], token_budget: int = 2048) -> list[tuple[float, int]]:
    """The scoring path before the chunked head: whole-batch logits into one reused buffer, NLL in chunks."""
    rows = windows(tok, texts, 1024, 512)
    pad, head = pad_id(tok), model.get_output_embeddings()
    plan = packed_batches(rows, token_budget, pack_width(model))
    w = head.weight
    buf = torch.empty(max(len(b) * batch_width(rows, b) for b in plan), w.shape[0])

    def forward(x):
        n = x.numel() // x.shape[-1]
        out = buf[:n]
        torch.mm(x.reshape(n, -1), w.t(), out=out)
        return out.view(*x.shape[:-1], w.shape[0])

    out = [[0.0, 0] for _ in texts]
    head.forward = forward
    try:
        for seqs in plan:
            for r, lg in _old_target_logits(model, rows, seqs, pad).items():
                i, _, tgt, _ = rows[r]
                out[i][0] += _old_nll(lg, tgt).sum().item()
                out[i][1] += len(tgt)
    finally:
        del head.forward
    return [tuple(o) for o in out]


def _old_target_logits(model, rows, seqs, pad):
    from lorascope.evals import token_windows

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
    mask = token_windows._block_mask(model, doc)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    return {r: logits[j, a:b] for r, j, a, b in spans}


def _old_nll(logits, targets):
    tgt = torch.tensor(targets)[:, None]
    out = torch.empty(len(targets))
    step = max(1, OLD_CHUNK // (4 * logits.shape[1]))
    for a in range(0, logits.shape[0], step):
        x = logits[a : a + step].float()
        out[a : a + step] = torch.logsumexp(x, dim=-1) - x.gather(1, tgt[a : a + step])[:, 0]
    return out


def scoring_flops(model, tok, texts: list[str]) -> float:
    """Linear-layer matmul FLOPs of scoring ``texts``: 2 x body weights per input token + 2 x head per target."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    rows = windows(tok, texts, 1024, 512)
    inputs, targets = sum(len(r[1]) for r in rows), sum(len(r[2]) for r in rows)
    return 2.0 * (body * inputs + head.weight.numel() * targets)


def timed(fn, *args, **kwargs):
    t = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - t


def bench_scoring(model, tok, texts, rounds: int) -> None:
    flops = scoring_flops(model, tok, texts)
    threads = torch.get_num_threads()
    peak = matmul_peak()
    print(f"matmul peak {peak:.1f} GFLOP/s per thread ({threads} threads); scoring {flops / 1e9:.1f} GFLOP")
    new_t, old_t = [], []
    for k in range(rounds):
        order = [("new", text_nll, new_t), ("old", old_text_nll, old_t)]
        for name, fn, acc in order if k % 2 == 0 else order[::-1]:
            res, dt = timed(fn, model, tok, texts)
            acc.append(dt)
            if name == "new":
                new_res = res
            else:
                old_res = res
    worst = max(abs(a[0] - b[0]) / max(b[1], 1) for a, b in zip(new_res, old_res))
    for name, ts in (("chunked head (new)", new_t), ("whole logits (old)", old_t)):
        best = min(ts)
        print(f"  {name}: CPU {best:.2f} s (best of {len(ts)}), MFU {flops / best / 1e9 / (peak * threads):.0%}")
    ratios = sorted(o / n for o, n in zip(old_t, new_t))
    print(
        f"  old / new CPU time per round: {', '.join(f'{r:.3f}' for r in ratios)}x; max |NLL diff| / token {worst:.1e}"
    )


def bench_kl(base, tok, texts) -> None:
    for head_too in (True, False):
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if (head_too or "embed" not in name) and p.dim() == 2:
                    p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
        with tempfile.TemporaryDirectory() as d, mock.patch.object(kl_cache, "cache_dir", lambda: Path(d)):
            two, t_two = timed(kl_per_text, tuned, base, tok, texts, cache=False)
            _, t_build = timed(kl_per_text, tuned, base, tok, texts, cache=True)
            got, t_got = timed(kl_per_text, tuned, base, tok, texts, cache=True)
            size = sum(f.stat().st_size for f in Path(d).rglob("*.npy"))
        tot, tot2 = sum(s + fs for s, _, fs, _ in two), sum(s + fs for s, _, fs, _ in got)
        n = sum(c + fc for _, c, _, fc in two)
        worst = max(abs((s + fs) - (s2 + fs2)) / (s + fs) for (s, _, fs, _), (s2, _, fs2, _) in zip(two, got))
        print(
            f"  KL, {'tuned head' if head_too else 'base head (LoRA case)'}: {tot / n:.5f} nats/token over {n} tokens;"
            f" cached / two-pass rel. diff {abs(tot2 - tot) / tot:.1e} (worst text {worst:.1e}); CPU two-pass"
            f" {t_two:.1f} s, build {t_build:.1f} s, cached {t_got:.1f} s; cache {size / 1e6:.1f} MB"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-kl", action="store_true")
    ap.add_argument("--chunk-mib", type=int, default=None, help="vocab_head.HEAD_CHUNK_BYTES for this run")
    args = ap.parse_args()
    if args.chunk_mib:
        vocab_head.HEAD_CHUNK_BYTES = args.chunk_mib << 20
    model, tok = load_base(args.model)
    model.eval()
    texts = [d["text"] for d in select_texts(tok, args.tokens)]
    vocab = model.get_output_embeddings().weight.shape[0]
    print(
        f"{args.model}: vocabulary {vocab}, {len(texts)} English texts, ~{args.tokens} tokens; process CPU time;"
        f" head chunks of {vocab_head.HEAD_CHUNK_BYTES >> 20} MiB"
    )
    bench_scoring(model, tok, texts, args.rounds)
    if not args.no_kl:
        bench_kl(model, tok, texts)


if __name__ == "__main__":
    main()
