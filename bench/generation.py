"""Batched vs one-at-a-time greedy generation on the embedded model (5-shot GSM8K prompts).

Compares lorascope.evals.generate.generate with batch_size=8 against the same function with batch_size=1
(each prompt prefilled and decoded alone, as per-item ``model.generate`` calls do) on the same GSM8K items,
and checks the outputs are identical. Prints wall times and the speed ratio.

    python bench/generation.py [--items 20] [--max-new-tokens 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from lorascope import benchdata
from lorascope.evals.generate import generate
from lorascope.evals.math_tasks import GSM8K, GSM8K_STOP
from lorascope.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="embedded")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    prefix = GSM8K().prompt_prefix(5)
    prompts = [f"{prefix}Question: {d['question']}\nAnswer:" for d in benchdata.gsm8k()[: args.items]]
    n_prompt = sum(len(tok(p)["input_ids"]) for p in prompts)
    kw = dict(max_new_tokens=args.max_new_tokens, stop=GSM8K_STOP, progress=True)

    generate(model, tok, prompts[:1], max_new_tokens=4, progress=False)  # warm-up
    t = time.perf_counter()
    batched = generate(model, tok, prompts, batch_size=args.batch_size, desc="batched", **kw)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = generate(model, tok, prompts, batch_size=1, desc="one-at-a-time", **kw)
    t_single = time.perf_counter() - t

    same = sum(a == b for a, b in zip(batched, single))
    new_tokens = sum(len(tok(c[0], add_special_tokens=False)["input_ids"]) for c in batched)
    print(f"model={args.model} items={len(prompts)} prompt_tokens={n_prompt} generated_tokens~{new_tokens} "
          f"max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")
    print(f"one-at-a-time (batch 1): {t_single:.1f} s")
    print(f"batched (batch {args.batch_size}):       {t_batched:.1f} s")
    print(f"speed ratio batched/one-at-a-time: {t_single / t_batched:.2f}x")
    print(f"identical outputs: {same}/{len(prompts)}")
    for i, (a, b) in enumerate(zip(batched, single)):
        if a != b:
            print(f"  item {i} differs:\n    batched: {a[0][:120]!r}\n    single:  {b[0][:120]!r}")


if __name__ == "__main__":
    main()
