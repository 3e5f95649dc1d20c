"""Weight-space figures from analysis/<run>/<ckpt>/spectrum.json (written by lorascope.analysis.spectrum).

Statistic: rank of dW at the study's energy fraction (default 90%), next to an i.i.d. Gaussian matrix of the
same shape through the same statistic (noise-like updates sit near the Gaussian).

Example::

    >>> latest = last_spectra(study)                # run_id -> spectrum.json of its last analysed checkpoint
    >>> b64 = heatmap_figure([(study.run(r)["label"], s) for r, s in latest.items()])
"""

from __future__ import annotations

from .collect import Study
from .figures import colors, new_figure, outside_legend, to_png


def _order(sp: dict) -> tuple:
    return (sp.get("tokens") or 0, sp.get("epoch") or 0, sp.get("step") or 0)


def spectra_by_run(st: Study) -> dict[str, list[dict]]:
    """run_id -> its spectrum.json documents in training order."""
    out: dict[str, list[dict]] = {}
    for (rid, _), sp in st.spectra.items():
        out.setdefault(rid, []).append(sp)
    return {k: sorted(v, key=_order) for k, v in out.items()}


def last_spectra(st: Study) -> dict[str, dict]:
    return {rid: v[-1] for rid, v in spectra_by_run(st).items()}


def modules_of(sp: dict) -> list[str]:
    seen: list[str] = []
    for r in sp.get("records", []):
        if r["module"] not in seen:
            seen.append(r["module"])
    return seen


def heatmap_figure(items: list[tuple[str, dict]]) -> str | None:
    """Rank of dW at the energy fraction, layer x module, one panel per run (unchanged matrices blank)."""
    import numpy as np

    items = [(n, sp) for n, sp in items if any(r["layer"] is not None for r in sp.get("records", []))]
    if not items:
        return None
    cols = min(len(items), 3)
    rows = (len(items) + cols - 1) // cols
    fig = new_figure(4.6 * cols, 4.2 * rows)
    for i, (name, sp) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        recs = [r for r in sp["records"] if r["layer"] is not None]
        mods = modules_of({"records": recs})
        layers = sorted({r["layer"] for r in recs})
        grid = np.full((len(layers), len(mods)), np.nan)
        for r in recs:
            if r["changed"]:
                grid[layers.index(r["layer"]), mods.index(r["module"])] = r["rank_at_energy"]["delta"]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(mods)), mods, rotation=45, ha="right", fontsize=7)
        step = max(1, len(layers) // 10)
        ax.set_yticks(range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{name}\n{sp.get('checkpoint', '')}: rank of dW @{sp.get('energy', 0.9):.0%}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return to_png(fig)


def _with_modules(items: list[tuple[str, dict]]) -> tuple[list[tuple[str, dict]], list[str]]:
    """The spectra that have per-module aggregates, and the module types in first-seen order."""
    items = [(n, sp) for n, sp in items if sp.get("aggregate", {}).get("by_module")]
    mods: list[str] = []
    for _, sp in items:
        mods += [m for m in sp["aggregate"]["by_module"] if m not in mods]
    return items, mods


def by_module_figure(items: list[tuple[str, dict]]) -> str | None:
    """Mean rank of dW by module type, a bar per run, the Gaussian baseline as a black tick."""
    items, mods = _with_modules(items)
    if not items:
        return None
    fig = new_figure(max(6.0, 1.2 * len(mods) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(items)
    col = colors([n for n, _ in items])
    for i, (name, sp) in enumerate(items):
        bm = sp["aggregate"]["by_module"]
        xs = [j - 0.4 + w * (i + 0.5) for j, m in enumerate(mods) if m in bm]
        ax.bar(xs, [bm[m]["delta_rank_at_energy"] for m in mods if m in bm], width=w, color=col[name], label=name)
        g = [(x, bm[m].get("gaussian_rank_at_energy")) for x, m in zip(xs, [m for m in mods if m in bm])]
        g = [(x, y) for x, y in g if y is not None]
        if g:
            ax.plot(
                [x for x, _ in g],
                [y for _, y in g],
                "_",
                color="black",
                ms=12,
                mew=2,
                label="Gaussian baseline" if i == 0 else None,
            )
    ax.set_xticks(range(len(mods)), mods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean rank of dW at energy")
    ax.grid(alpha=0.3, axis="y")
    outside_legend(ax)
    return to_png(fig)


def trajectory_figure(st: Study) -> str | None:
    """Mean rank of dW over training, for runs analysed at several checkpoints."""
    series = {rid: v for rid, v in spectra_by_run(st).items() if len(v) > 1}
    if not series:
        return None
    fig = new_figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    col = colors([st.run(r)["label"] for r in series])
    for rid, sps in series.items():
        xs, ys, gs = [], [], []
        for sp in sps:
            ch = [r for r in sp.get("records", []) if r["changed"]]
            if ch:
                xs.append(sp.get("tokens") or sp.get("epoch") or sp.get("step"))
                ys.append(sum(r["rank_at_energy"]["delta"] for r in ch) / len(ch))
                gs.append(sum(r["baseline_rank_at_energy"]["gaussian"] or 0 for r in ch) / len(ch))
        name = st.run(rid)["label"]
        ax.plot(xs, ys, marker="o", color=col[name], label=name)
        ax.plot(xs, gs, ls=":", color=col[name], lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("mean rank of dW at energy (dotted: Gaussian)")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    return to_png(fig)


def intruders_missing(items: list[tuple[str, dict]]) -> str:
    """What the page says where intruders_figure draws nothing: no counts, or none found."""
    if not _with_modules(items)[0]:
        return "no intruder counts."
    return "none found: no run's weight update has an intruder dimension, in any module (every count is 0)."


def intruders_figure(items: list[tuple[str, dict]]) -> str | None:
    """Intruder dimensions per run, stacked by module type; None when there is nothing to draw (no counts, or
    every count 0: an empty axis would look like a missing figure; intruders_missing says which)."""
    items, mods = _with_modules(items)
    counts = [sp["aggregate"]["by_module"].get(m, {}).get("intruders_total", 0) for _, sp in items for m in mods]
    if not any(counts):
        return None
    fig = new_figure(max(5.0, 1.3 * len(items) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    bottom = [0.0] * len(items)
    col = colors(mods)
    for m in mods:
        vals = [sp["aggregate"]["by_module"].get(m, {}).get("intruders_total", 0) for _, sp in items]
        ax.bar(range(len(items)), vals, bottom=bottom, color=col[m], label=m)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("intruder dimensions (count)")
    ax.grid(alpha=0.3, axis="y")
    outside_legend(ax)
    return to_png(fig)
