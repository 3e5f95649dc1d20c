"""Benchmark: training step time of lorascope and of HF Trainer (+ PEFT), all configurations in ONE process, steps
alternated, so each ratio is paired (taken within a round) and the machine's drift cancels.

Between separate processes this kind of machine's step time drifts by 5-10% (the same LoRA step measured 4.22 s
and 4.45 s in two processes a minute apart, no steal time), more than the differences asked about; so here every
configuration lives in one process and the rounds take one optimizer step of each in turn, order reversed
every other round. Configurations (embedded model, code-cpt rows, seq 256 x batch 4, AdamW, fp32, grad clip 1.0,
LRs and adapter as in train_throughput.py):
    lorascope full / LoRA r16 (dropout 0.05) / LoRA r16 dropout 0   -- ``train.Trainer.run_step``
    Trainer full / Trainer + PEFT LoRA r16 (dropout 0.05)            -- ``transformers.Trainer.train``
HF's ``train()`` runs in its own thread and waits in a callback at every step's end until its next turn (only
one configuration computes at a time); its step is timed from the turn given to that callback, so its batch
fetch and bookkeeping count, as lorascope's ``run_step`` timing counts its own. Peak RSS needs one process per
configuration: ``train_throughput.py`` measures it. MFU uses train_throughput's FLOP counts and one fp32 matmul
peak measured after the rounds.

    python bench/train_paired.py [--rounds 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import train_throughput as tt

CONFIGS = ("lorascope full", "lorascope lora-r16", "lorascope lora-r16 p=0", "trainer full", "trainer lora-r16")
RATIOS = (
    ("lorascope lora-r16", "lorascope full"),
    ("lorascope lora-r16 p=0", "lorascope full"),
    ("lorascope full", "trainer full"),
    ("lorascope lora-r16", "trainer lora-r16"),
    ("trainer lora-r16", "trainer full"),
)


def lorascope_stepper(method: str, dropout: float, tmp: Path):
    from lorascope.train.loop import Trainer

    tr = Trainer.setup(tt.lorascope_config(method, 10**7, dropout), tmp)
    count = iter(range(10**6))
    return lambda: tr.run_step(next(count), 1.0)


class TrainerStepper:
    """transformers.Trainer.train() in a thread that hands control back at the end of every optimizer step."""

    def __init__(self, method: str, steps: int, tmp: Path) -> None:
        import torch
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback

        self.turn, self.done, threads = threading.Semaphore(0), threading.Semaphore(0), torch.get_num_threads()
        stepper = self

        class Handover(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                stepper.done.release()
                stepper.turn.acquire()

        trainer = tt.peer_trainer(method, steps + 1, tmp, Handover())
        trainer.remove_callback(PrinterCallback)  # its log line each step; the logging itself stays, as timed

        def run() -> None:
            torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread
            self.turn.acquire()
            trainer.train()
            self.done.release()

        threading.Thread(target=run, daemon=True).start()

    def __call__(self) -> None:
        self.turn.release()
        self.done.acquire()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seq", type=int, default=tt.SEQ)
    args = ap.parse_args()
    tt.SEQ = args.seq  # train_throughput's FLOP counts and configurations read it
    from lorascope.procenv import reexec_with_fast_malloc

    reexec_with_fast_malloc(sys.argv)
    tmp = Path(tempfile.mkdtemp())
    steppers = {
        "lorascope full": lorascope_stepper("full", 0.0, tmp / "a"),
        "lorascope lora-r16": lorascope_stepper("lora-r16", 0.05, tmp / "b"),
        "lorascope lora-r16 p=0": lorascope_stepper("lora-r16", 0.0, tmp / "c"),
        "trainer full": TrainerStepper("full", args.rounds + 1, tmp / "d"),
        "trainer lora-r16": TrainerStepper("lora-r16", args.rounds + 1, tmp / "e"),
    }
    times = rounds(steppers, args.rounds)
    report(times, tt.matmul_peak(), args.rounds)


def rounds(steppers: dict, n: int) -> dict[str, list[float]]:
    """Step times of every configuration, round 0 (warm-up) dropped, order reversed every other round."""
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(n + 1):
        for k in list(steppers) if r % 2 else list(steppers)[::-1]:
            t = time.perf_counter()
            steppers[k]()
            if r:
                times[k].append(time.perf_counter() - t)
    return times


def report(times: dict[str, list[float]], peak: float, n: int) -> None:
    tokens = tt.SEQ * tt.BATCH
    print(
        f"seq {tt.SEQ} x batch {tt.BATCH}, fp32, AdamW; {n} rounds (+1 warm-up) in one process, one step of each "
        f"configuration a round; median [min-max]; MFU against {peak / 1e9:.0f} GFLOP/s (fp32 matmul, measured "
        f"after the rounds)"
    )
    for k in CONFIGS:
        med = statistics.median(times[k])
        fpt = tt.flops_per_token(k.split()[1])
        print(
            f"  {k:<24} step {tt._spread(times[k], 3)} s  {tokens / med:6.1f} tok/s",
            f" MFU {fpt * tokens / med / peak:.0%}",
            sep="",
        )
    for a, b in RATIOS:
        r = [tb / ta for ta, tb in zip(times[a], times[b])]
        print(f"  {a} / {b}: tokens/s {tt._spread(r, 3)}x")


if __name__ == "__main__":
    main()
