"""Equivalence margins, fixed before the test split is read: from the study file, else from validation.

A margin derived from the numbers being tested is circular (its noise correlates with the tested difference).
`report.margins` in the study file sets one per role or per task, either absolute (in the metric's signed units)
or relative to full fine-tuning's effect on the *validation* split; the default is 10% of that effect:

    report:
      margins: {learning: 0.003, forgetting: "10%", "heldout_bpb:code-cpt": "20%"}

A task's own key wins over its role's. Example::

    >>> margin({"learning": "20%"}, "learning", "humaneval", validation_effect=0.05)
    (0.01, "20% of full FT's validation learning")
    >>> margin({"humaneval": 0.02}, "learning", "humaneval", validation_effect=0.05)
    (0.02, 'study file (absolute)')
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .decide import MARGIN_DEFAULT


def parse(value, where: str) -> tuple[str, float]:
    """("relative", share) for "N%", ("absolute", x) for a positive number; ConfigError otherwise."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            share = math.nan
        if not 0 < share < 1:
            raise ConfigError(f"{where}: expected a share like '10%' (between 0 and 100%), got {value!r}")
        return "relative", share
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return "absolute", float(value)
    raise ConfigError(f"{where}: expected a positive number (absolute) or a share like '10%', got {value!r}")


def margin(spec: dict | None, role: str, task: str, validation_effect: float | None) -> tuple[float | None, str]:
    """(margin, where it came from) for one comparison; (None, why) when a relative margin has no validation
    effect to scale (then no equivalence can be claimed)."""
    spec = spec or {}
    key = task if task in spec else role if role in spec else None
    kind, x = parse(spec[key], f"report.margins.{key}") if key else parse(MARGIN_DEFAULT, "report.margins")
    if kind == "absolute":
        return x, "study file (absolute)"
    if validation_effect is None or not math.isfinite(validation_effect) or validation_effect == 0:
        return None, f"no full-FT validation {role} to scale {x:.0%} of"
    return round(x * abs(validation_effect), 12), f"{x:.0%} of full FT's validation {role}"
