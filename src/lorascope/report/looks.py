"""Which look at the study the verdicts are, after ``lorascope study STUDY --resolve`` (study/resolve.py).

A study extended and read again tests its questions again; each look may spend only part of the error rate
(O'Brien-Fleming-type alpha spending over at most 3 looks). STUDY/resolve.json records every look with its
two-sided ``alpha_level`` and the cumulative ``alpha_spent``; the report tests the latest look's Holm family at
that level (not 0.05) and says so near the verdicts. Without resolve.json the study is its first and only look.

    >>> look = current_look(Path("studies/quick"))      # None before any --resolve
    >>> look["look"], round(look["alpha_level"], 4), round(look["alpha_spent"], 4)   # after one --resolve
    (2, 0.0161, 0.0164)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LorascopeError

STATE = "resolve.json"  # written by study/resolve.py (the report never imports the study)


def current_look(study_dir: Path) -> dict | None:
    """{"look", "max_looks", "alpha_level", "alpha_spent", "alpha", "spending"} of the latest look, or None."""
    f = Path(study_dir) / STATE
    if not f.exists():
        return None
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
        last = state["looks"][-1]
        return {
            "look": int(last["look"]),
            "max_looks": int(state.get("max_looks", 3)),
            "alpha_level": float(last["alpha_level"]),
            "alpha_spent": float(last["alpha_spent"]),
            "alpha": float(state.get("alpha", 0.05)),
            "spending": state.get("spending", "Lan-DeMets, O'Brien-Fleming type"),
        }
    except json.JSONDecodeError as e:
        raise LorascopeError(f"{f}: not valid JSON ({e.msg})") from None
    except (KeyError, IndexError, TypeError, ValueError):
        raise LorascopeError(f"{f}: no look with alpha_level and alpha_spent") from None


def look_sentence(look: dict | None) -> str:
    """The look in words, for the page ("" without one)."""
    if not look:
        return ""
    return (
        f"Look {look['look']} of at most {look['max_looks']} (O'Brien-Fleming alpha spending): tested at "
        f"alpha = {look['alpha_level']:.3g}, cumulative alpha spent {look['alpha_spent']:.3g} of "
        f"{look['alpha']:g}."
    )
