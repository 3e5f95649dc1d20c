"""Learning-rate multipliers (LambdaLR style): constant, cosine and warmup-stable-decay (the paper's CPT shape).

    f = multiplier("wsd", total_steps=100, warmup_steps=10, cooldown_frac=0.2, min_ratio=0.01)
    [round(f(s), 3) for s in (0, 9, 50, 80, 99)]  ->  [0.1, 1.0, 1.0, 0.951, 0.01]
    torch.optim.lr_scheduler.LambdaLR(opt, f)      # usable as is; every group keeps its own base lr

The training loop applies them as a pure function of the optimizer step (lr_group = base_lr_group * f(step)),
so resuming or branching needs no scheduler state: the step counter is the whole schedule state.
Every schedule reaches its final value (min_ratio for cosine/wsd) at the last step, step total-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

KINDS = ("constant", "cosine", "wsd")


def multiplier(
    kind: str, total_steps: int, warmup_steps: int, cooldown_frac: float = 0.2, min_ratio: float = 0.01
) -> Callable[[int], float]:
    """lr(step) / base_lr for optimizer step `step` (0-based), covering exactly `total_steps` steps.

    constant: linear warmup then 1.0. cosine: warmup then a half cosine from 1.0 to min_ratio.
    wsd: warmup, stable at 1.0, then linear decay to min_ratio over the last cooldown_frac of the steps.
    """
    total = max(1, total_steps)

    def warm(s: int) -> float | None:
        return (s + 1) / warmup_steps if s < warmup_steps else None

    if kind == "constant":
        return lambda s: warm(s) or 1.0
    if kind == "cosine":

        def cos(s: int) -> float:
            w = warm(s)
            if w is not None:
                return w
            p = min(1.0, (s - warmup_steps + 1) / max(1, total - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

        return cos
    if kind == "wsd":
        return lambda s: warm(s) or decay(s, total, cooldown_frac, min_ratio)
    raise ValueError(f"unknown schedule {kind!r} (known: {', '.join(KINDS)})")


def branch_multiplier(
    main: Callable[[int], float], budget_steps: int, cooldown_frac: float, min_ratio: float
) -> Callable[[int], float]:
    """The cooldown of an intermediate budget: the main (wsd) schedule, decayed to min_ratio at budget_steps."""
    return lambda s: min(main(s), decay(s, budget_steps, cooldown_frac, min_ratio))


def decay(s: int, total: int, cooldown_frac: float, min_ratio: float) -> float:
    """Stable at 1.0, then linear decay reaching min_ratio at step total-1 over the last cooldown_frac of `total`."""
    start = cooldown_start(total, cooldown_frac)
    if s < start:
        return 1.0
    n = max(1, total - start)
    return 1.0 - (1.0 - min_ratio) * min(1.0, (s - start + 1) / n)


def cooldown_start(total: int, cooldown_frac: float) -> int:
    """First step of the cooldown of a `total`-step budget (80% of it for the paper's 20% cooldown)."""
    return total - int(round(total * cooldown_frac))
