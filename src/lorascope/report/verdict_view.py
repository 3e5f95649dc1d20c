"""What the headline shows of a setting's verdicts (questions.py): one line per question and comparison, the
learning rates chosen on validation with the LoRA / full FT ratio, and the paper-style frontier figure.

Example::

    >>> verdict_lines(h)[0]["text"]
    'Does lora-r16 lr=0.0002 learn less than full lr=2e-05 (at 8,192 tokens)?'
    >>> lr_rows(h.chosen_lrs, {"full": "full", "lora-r16": "lora"})
    [['full', 'full', 2e-05, None], ['lora-r16', 'lora', 0.0002, 10.0]]
"""

from __future__ import annotations

from .compare import Headline
from .figures import colors, new_figure, outside_legend, to_png

QUESTIONS = {"learns_less": "Does {a} learn less than {b}{at}?",
             "forgets_less_at_equal_learning": "Does {a} forget less than {b} at equal learning?"}


def _num(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4g}"  # + 0.0: a rounded -0.0 prints as +0


def verdict_lines(h: Headline, by: str = "tokens") -> list[dict]:
    """{"text", "verdict", "numbers", "reason", "notes"} per verdict, in the engine's order; `by`: the budget's
    unit ("tokens" or "epoch")."""
    out = []
    for v in h.verdicts:
        b = v.get("budget")
        at = "" if b is None else f" (at epoch {b:g})" if by == "epoch" else f" (at {b:,} tokens)"
        q = QUESTIONS.get(v["question"], v["question"] + " ({a} vs {b}{at})")
        numbers = None
        if v.get("estimate") is not None:
            numbers = f"difference {v.get('a')} − {v.get('b')}: {_num(v['estimate'])}"
            if v.get("interval") is not None:
                lo, hi = v["interval"]
                numbers += f" [{_num(lo)}, {_num(hi)}] ({v.get('level', 0.95):.0%} interval)"
            if v.get("range") is not None:
                numbers += f", over the learning range {_num(v['range'][0])} to {_num(v['range'][1])}"
        notes = [x for x in (f"noise: {v['noise']}" if v.get("noise") else None,
                             f"{v['split']} split" if v.get("split") else None, v.get("correction"),
                             v.get("power")) if x]
        out.append({"text": q.format(a=v.get("a"), b=v.get("b"), at=at), "verdict": v["verdict"],
                    "numbers": numbers, "reason": v.get("reason") or "", "notes": notes})
    return out


def lr_rows(chosen: dict[str, float], family: dict[str, str]) -> list[list]:
    """[method, family, chosen LR, LR / full FT's chosen LR] per method; the ratio needs one full-FT method."""
    fulls = [m for m in chosen if family.get(m) == "full"]
    ref = chosen[fulls[0]] if len(fulls) == 1 and chosen[fulls[0]] else None
    return [[m, family.get(m), lr, lr / ref if ref and family.get(m) not in (None, "full") and lr else None]
            for m, lr in sorted(chosen.items(), key=lambda x: (family.get(x[0]) != "full", x[0]))]


def frontier_figure(frontiers: dict) -> tuple[str | None, str | None]:
    """Learning (x) vs forgetting (y), both vs the base and on the test split: each family's points, its
    monotone frontier, and the matched-learning band where the families are compared. Returns (png, caption)."""
    fams = {f: fr for f, fr in frontiers.items() if fr.get("points")}
    if not fams:
        return None, None
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    col = colors(list(fams))
    band = next((fr["band"] for f, fr in sorted(fams.items()) if f != "full" and fr.get("band")), None)
    if band:
        ax.axvspan(*band, color="gold", alpha=0.25, lw=0, label="matched-learning band")
    for f, fr in sorted(fams.items()):
        ax.scatter([p[0] for p in fr["points"]], [p[1] for p in fr["points"]], s=22, color=col[f], alpha=0.7)
        if fr.get("curve"):
            ax.plot([c[0] for c in fr["curve"]], [c[1] for c in fr["curve"]], color=col[f], lw=1.8,
                    label=f"{f} frontier")
    ax.axhline(0, color="black", lw=0.8, ls="--")
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.plot([0], [0], marker="*", ms=12, color="black", ls="none", label="base")
    ax.set_xlabel("learning vs base (→ more learned)")
    ax.set_ylabel("forgetting vs base (↑ more forgotten)")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    cap = ("Each dot is one configuration (learning rate, budget; seeds pooled) on the test split; lines are each "
           "family's monotone frontier (forgetting never decreasing with learning). ")
    cap += (f"Shaded: the learning range both families reach ({_num(band[0])} to {_num(band[1])}), where "
            "forgetting is compared at equal learning." if band else
            "No shaded band: the families' learning ranges do not overlap, so they cannot be compared at equal "
            "learning.")
    return to_png(fig), cap
