"""Figures of the report as base64 PNG strings (matplotlib's object API on the Agg canvas: no pyplot state, no
display needed). Each function returns None when it has nothing to draw, so the page can say "not run".

Example::

    >>> b64 = loss_figure(study.runs)          # 'iVBORw0KGgo...'
    >>> html = f'<img src="data:image/png;base64,{b64}">'
"""

from __future__ import annotations

import base64
import io

from matplotlib import colormaps
from matplotlib.figure import Figure

from .compare import Point, axis
from .metrics import MetricSpec, spec

DPI = 90


def to_png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def colors(names: list[str]) -> dict[str, tuple]:
    """One stable colour per curve name, shared by every figure of a setting."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(sorted(set(names)))}


def _grid(n: int, w: float = 4.2, h: float = 3.2) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(w * cols, h * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def curves_figure(ps: list[Point], base: dict, role: str) -> str | None:
    """One panel per task of `role`: the task's metric vs tokens/epochs, a line per configuration with stderr
    error bars, the base model as a dashed line."""
    specs = sorted({(t, m) for p in ps for (t, m) in p.values if (s := spec(t)) and s.role == role
                    and s.metric == m})
    if not ps or not specs:
        return None
    by = axis(ps)
    col = colors([p.name for p in ps])
    fig, axes = _grid(len(specs))
    for ax, (task, metric) in zip(axes, specs):
        for name in sorted({p.name for p in ps}):
            pts = sorted((p for p in ps if p.name == name and (task, metric) in p.values
                          and p.position(by) is not None), key=lambda p: p.position(by))
            if pts:
                ax.errorbar([p.position(by) for p in pts], [p.values[(task, metric)][0] for p in pts],
                            yerr=[p.values[(task, metric)][1] or 0 for p in pts], marker="o", ms=4, capsize=3,
                            color=col[name], label=name)
        if (task, metric) in base:
            ax.axhline(base[(task, metric)][0], ls="--", color="black", lw=1, label="base")
        s = spec(task)
        ax.set_title(f"{task} {metric} ({'↑' if s.higher_better else '↓'} better)", fontsize=9)
        ax.set_xlabel(by)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return to_png(fig)


def loss_figure(runs: list[dict]) -> str | None:
    """Training loss vs tokens, a line per run."""
    runs = [r for r in runs if r.get("loss")]
    if not runs:
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    col = colors([r["label"] for r in runs])
    for r in runs:
        pts = [(x["tokens"], x["loss"]) for x in r["loss"] if isinstance(x.get("loss"), (int, float))]
        if pts:
            ax.plot(*zip(*pts), color=col[r["label"]], label=r["label"] + (" (diverged)" if r["diverged"] else ""),
                    lw=1.2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_png(fig)


def _frontier(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points when both coordinates are 'higher is better', sorted by the first."""
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)]
    return sorted(set(front))


def pareto_figure(ps: list[Point], base: dict, L: MetricSpec, F: MetricSpec) -> str | None:
    """Learning (y) vs forgetting metric (x), one point per configuration x checkpoint, each family's frontier."""
    lk, fk = (L.task, L.metric), (F.task, F.metric)
    pts = [p for p in ps if lk in p.values and fk in p.values and not p.diverged]
    if not pts:
        return None
    fig = Figure(figsize=(6.5, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    col = colors([p.name for p in ps])
    for name in sorted({p.name for p in pts}):
        mine = [p for p in pts if p.name == name]
        ax.errorbar([p.values[fk][0] for p in mine], [p.values[lk][0] for p in mine],
                    xerr=[p.values[fk][1] or 0 for p in mine], yerr=[p.values[lk][1] or 0 for p in mine],
                    ls="none", marker="o", ms=5, capsize=2, color=col[name], label=name)
    fam_style = ["-", "--", ":", "-."]
    for i, fam in enumerate(sorted({p.family for p in pts})):
        # frontier in 'higher is better' coordinates, drawn back in the metrics' own units
        sx, sy = (1 if F.higher_better else -1), (1 if L.higher_better else -1)
        front = _frontier([(sx * p.values[fk][0], sy * p.values[lk][0]) for p in pts if p.family == fam])
        if front:
            ax.plot([sx * x for x, _ in front], [sy * y for _, y in front], fam_style[i % 4], color="gray",
                    lw=1.5, label=f"{fam} frontier")
    if lk in base and fk in base:
        ax.plot([base[fk][0]], [base[lk][0]], marker="*", ms=14, color="black", ls="none", label="base")
    # axes oriented like the paper's plot whatever the metric's direction: up = learned, right = kept
    if not L.higher_better:
        ax.invert_yaxis()
    if not F.higher_better:
        ax.invert_xaxis()
    ax.set_xlabel(f"{F.task} {F.metric} (right = less forgetting)")
    ax.set_ylabel(f"{L.task} {L.metric} (up = more learning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_png(fig)


def truncation_figure(points_by_rank: list[tuple[str, dict]], base: dict, full: dict, specs: list[MetricSpec]) -> str | None:
    """Metric vs kept rank of dW (rank-r truncations of a full-FT run), the untruncated run and the base."""
    specs = [s for s in specs if any((s.task, s.metric) in v for _, v in points_by_rank)]
    if not points_by_rank or not specs:
        return None
    fig, axes = _grid(len(specs))
    labels = [r for r, _ in points_by_rank] + ["full dW"]
    for ax, s in zip(axes, specs):
        k = (s.task, s.metric)
        ys = [v.get(k, (float("nan"), None))[0] for _, v in points_by_rank] + [full.get(k, (float("nan"),))[0]]
        es = [v.get(k, (0, None))[1] or 0 for _, v in points_by_rank] + [(full.get(k, (0, None))[1] or 0)]
        ax.errorbar(range(len(ys)), ys, yerr=es, marker="o", capsize=3)
        ax.set_xticks(range(len(ys)), labels, fontsize=8)
        if k in base:
            ax.axhline(base[k][0], ls="--", color="black", lw=1, label="base")
            ax.legend(fontsize=7)
        ax.set_title(f"{s.task} {s.metric} ({'↑' if s.higher_better else '↓'} better)", fontsize=9)
        ax.set_xlabel("rank kept")
        ax.grid(alpha=0.3)
    return to_png(fig)


def diversity_figure(rows: list[tuple[str, float, float]], task: str) -> str | None:
    """Mean unique completions per problem, passing and failing, per model (the paper's section 5)."""
    if not rows:
        return None
    fig = Figure(figsize=(max(5, 1.1 * len(rows)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="unique passing", color="tab:green")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="unique failing", color="tab:red")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{task}: unique completions / problem")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return to_png(fig)
