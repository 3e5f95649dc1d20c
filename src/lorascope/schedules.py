"""Learning-rate multipliers (LambdaLR style): constant, cosine and warmup-stable-decay (the paper's CPT shape).

    f = multiplier("wsd", total_steps=100, warmup_steps=10, cooldown_frac=0.2, min_ratio=0.01)
    [round(f(s), 2) for s in (0, 9, 50, 80, 99)]  ->  [0.1, 1.0, 1.0, 0.95, 0.01]
"""

from __future__ import annotations

import math
from typing import Callable


def multiplier(kind: str, total_steps: int, warmup_steps: int, cooldown_frac: float = 0.2,
               min_ratio: float = 0.01) -> Callable[[int], float]:
    """lr(step) / base_lr for optimizer step `step` (0-based), covering exactly `total_steps` steps."""
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
            p = (s - warmup_steps) / max(1, total - warmup_steps)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        return cos
    if kind == "wsd":
        return lambda s: warm(s) or decay(s, total, cooldown_frac, min_ratio)
    raise ValueError(f"unknown schedule {kind!r}")


def decay(s: int, total: int, cooldown_frac: float, min_ratio: float) -> float:
    """Stable at 1.0, then linear decay to min_ratio over the last cooldown_frac of `total` steps."""
    start = cooldown_start(total, cooldown_frac)
    if s < start:
        return 1.0
    n = max(1, total - start)
    return 1.0 - (1.0 - min_ratio) * min(1.0, (s - start + 1) / n)


def cooldown_start(total: int, cooldown_frac: float) -> int:
    return total - int(round(total * cooldown_frac))
