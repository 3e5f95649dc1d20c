"""Batched vs one-at-a-time greedy generation on the embedded model (5-shot GSM8K and HumanEval prompts).

Compares lorascope.evals.generate.generate with ``--batch-size`` (greedy: continuous batching with the shared
few-shot prefix prefilled once, stop strings checked only where a new token can end one) against the same
function with batch_size=1 (``model.generate`` on each prompt alone, static KV cache, as per-item calls do) on
the same items, with each task's own stop strings, and checks the outputs are identical. Prints wall and CPU-time
ratios (the CPU-time ratio is the robust one when other jobs share the cores).

    python bench/generation.py [--items 20] [--max-new-tokens 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from lorascope import benchdata
from lorascope.evals.code_tasks import HumanEval
from lorascope.evals.generate import generate
from lorascope.evals.math_tasks import GSM8K, GSM8K_STOP
from lorascope.models import load_model


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="embedded")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    prefix = GSM8K().prompt_prefix(5)
    he = HumanEval()
    sets = {
        "gsm8k 5-shot": (
            [f"{prefix}Question: {d['question']}\nAnswer:" for d in benchdata.gsm8k()[: args.items]],
            GSM8K_STOP,
        ),
        "humaneval": ([he.prompt(d, "base") for d in he.load()[: args.items]], he.stops("base")),
    }
    generate(model, tok, ["warm-up"], max_new_tokens=4, progress=False)
    print(
        f"model={args.model} items={args.items} per set, max_new_tokens={args.max_new_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    totals = [0.0] * 4
    for name, (prompts, stop) in sets.items():
        kw = dict(max_new_tokens=args.max_new_tokens, stop=stop, progress=False)
        batched, bw, bc = timed(
            lambda prompts=prompts, kw=kw: generate(model, tok, prompts, batch_size=args.batch_size, **kw)
        )
        single, sw, sc = timed(lambda prompts=prompts, kw=kw: generate(model, tok, prompts, batch_size=1, **kw))
        totals = [a + b for a, b in zip(totals, (sw, sc, bw, bc))]
        same = sum(a == b for a, b in zip(batched, single))
        n_prompt = sum(len(tok(p)["input_ids"]) for p in prompts)
        n_new = sum(len(tok(c[0], add_special_tokens=False)["input_ids"]) for c in batched)
        print(
            f"{name:13s} prompt tokens {n_prompt:6d} new~{n_new:5d} | one-at-a-time wall {sw:6.1f} s cpu {sc:6.1f} s"
            f" | batched wall {bw:6.1f} s cpu {bc:6.1f} s | wall {sw / bw:5.2f}x cpu {sc / bc:5.2f}x | "
            f"identical {same}/{len(prompts)}",
            flush=True,
        )
        for i, (a, b) in enumerate(zip(batched, single)):
            if a != b:
                print(f"  item {i} differs:\n    batched: {a[0][:120]!r}\n    single:  {b[0][:120]!r}")
    print(f"both sets: wall {totals[0] / totals[2]:5.2f}x cpu {totals[1] / totals[3]:5.2f}x")


if __name__ == "__main__":
    main()
