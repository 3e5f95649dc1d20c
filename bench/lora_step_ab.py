"""A/B of lorascope's LoRA layers and head loss inside one training process, steps alternated.

Between separate processes this machine's tokens/s spread by up to 10%, more than the effects measured here, so
each comparison switches one thing on and off between the optimizer steps of ONE model (the loop's
``Trainer.run_step``: embedded model, LoRA r16 on all seven projections, dropout 0.05, seq 256 x batch 4,
code-cpt rows) and prints paired ratios of step times, median [min-max]:
    peft's own update (lorascope.train.lora_layers.FusedUpdate switched off) against the fused update;
    the head loss as it is against the same loss with ``headloss.CHUNK_BYTES`` at 48 and 32 MiB.
It re-executes itself under the allocator lorascope gives its training jobs (``procenv.reexec_with_fast_malloc``).

    python bench/lora_step_ab.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _trainer():
    from lorascope.config import RunConfig
    from lorascope.train.loop import Trainer

    cfg = RunConfig(
        model="embedded",
        data={"dataset": "code-cpt"},
        method={"kind": "lora", "rank": 16, "targets": "all"},
        train={
            "seq_len": 256,
            "batch_size": 4,
            "max_tokens": 10**6,
            "lr": 1e-4,
            "schedule": "constant",
            "warmup_frac": 0.0,
        },
    )
    return Trainer.setup(cfg, Path(tempfile.mkdtemp()))


def _switches(tr) -> dict:
    """name -> function that puts the model in that configuration."""
    from lorascope.train import headloss

    fused = {mod: dict(mod.lora_variant) for mod in tr.model.modules() if getattr(mod, "lora_variant", None)}

    def config(use_fused: bool, chunk_mib: int):
        def apply():
            for mod, variants in fused.items():
                mod.lora_variant.clear()
                if use_fused:
                    mod.lora_variant.update(variants)
            headloss.CHUNK_BYTES = chunk_mib * 2**20

        return apply

    return {
        "as is": config(True, 64),
        "peft's update": config(False, 64),
        "head 48 MiB": config(True, 48),
        "head 32 MiB": config(True, 32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    from lorascope.procenv import reexec_with_fast_malloc

    reexec_with_fast_malloc(sys.argv)
    tr = _trainer()
    switches = _switches(tr)
    names = list(switches)
    times: dict[str, list[float]] = {n: [] for n in names}
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms up
        for n in names if r % 2 else names[::-1]:
            switches[n]()
            t = time.perf_counter()
            tr.run_step(step, 1.0)
            step += 1
            if r:
                times[n].append(time.perf_counter() - t)
    switches["as is"]()
    print(f"LoRA r16 training steps alternated in one process, seq 256 x batch 4, {args.rounds} rounds")
    for n in names:
        print(f"  {n:<14} step median {statistics.median(times[n]):.3f} s")
    for n in names[1:]:
        r = [b / a for a, b in zip(times["as is"], times[n])]
        print(f"  {n} / as is: {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]x step time")


if __name__ == "__main__":
    main()
