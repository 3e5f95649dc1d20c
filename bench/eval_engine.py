"""Scoring engine vs lm-eval's naive method on the embedded model (same items, same prompts).

Compared: ``engine.score_naive`` (every context+choice as its own full sequence, logits everywhere, batches of
8 sequences: what lm-eval's HF backend does) against ``engine.score`` (context once per item with its KV cache
copied to the choices, few-shot block cached once per task, logits only where scored; passes of at most as
many padded tokens as 8 naive sequences of the same items, so both hold the same activation memory per pass).
Checks identical predictions (acc and acc_norm) and max |delta loglik|; prints the speed ratio of wall time
and of this process's CPU time (the CPU-time ratio is the robust one when other jobs share the cores).

    python bench/eval_engine.py [N_ITEMS]        # default 40 items each of HellaSwag, ARC-Challenge, WinoGrande
    LORASCOPE_THREADS=1 python bench/eval_engine.py 20
"""

from __future__ import annotations

import sys
import time

import torch

from lorascope.evals.engine import score, score_naive
from lorascope.evals.multiple_choice import ArcChallenge, HellaSwag, WinoGrande
from lorascope.models import load_base


def requests_for(task, n: int, shots: int):
    items = [task.to_item(d) for d in task.load(task.split)[:n]]
    prefixes = task._fewshot(items, shots, seed=0)
    per_item = [task.requests(it, prefixes[it.id]) for it in items]
    return items, [len(r) for r in per_item], [r for rs in per_item for r in rs]


def preds(items, spans, scored):
    """(acc, acc_norm) prediction per item; an item is one request, or one per choice (WinoGrande)."""
    out, at = [], 0
    for it, n in zip(items, spans):
        lls = [ll for res in scored[at : at + n] for ll, _ in res]
        at += n
        norm = [ll / len(c) for ll, c in zip(lls, it.choices)]
        out.append((lls.index(max(lls)), norm.index(max(norm))))
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    model, tok = load_base("embedded")
    print(
        f"embedded model, {torch.get_num_threads()} threads, {n} items per task, batch 8 (naive: 8 sequences "
        f"per pass; engine: the same padded-token budget per pass)"
    )
    rows = []
    for task in (HellaSwag(), ArcChallenge(), WinoGrande()):
        for shots in (0, 5):
            items, spans, reqs = requests_for(task, n, shots)
            score(model, tok, reqs[:2])  # warm-up (allocator, lazy init) outside the timing
            t, c = time.perf_counter(), time.process_time()
            fast = score(model, tok, reqs, batch_size=8)
            t_fast, c_fast = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            naive = score_naive(model, tok, reqs, batch_size=8)
            t_naive, c_naive = time.perf_counter() - t, time.process_time() - c
            dmax = max(abs(a[0] - b[0]) for ra, rb in zip(fast, naive) for a, b in zip(ra, rb))
            same = preds(items, spans, fast) == preds(items, spans, naive)
            rows.append((task.name, shots, t_naive, t_fast, t_naive / t_fast, dmax, same))
            print(
                f"{task.name:14s} {shots}-shot  wall: naive {t_naive:7.1f} s engine {t_fast:6.1f} s "
                f"= {t_naive / t_fast:5.2f}x | cpu: naive {c_naive:7.1f} s engine {c_fast:6.1f} s "
                f"= {c_naive / c_fast:5.2f}x | max|dloglik| {dmax:.2e} | same predictions: {same}",
                flush=True,
            )
    ok = all(r[6] and r[5] <= 1e-3 for r in rows)
    print("all predictions identical and |dloglik| <= 1e-3:", ok)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
