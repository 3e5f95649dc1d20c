"""Figures of the report as base64 PNG strings (matplotlib's object API on the Agg canvas: no pyplot state, no
display needed). Each function returns None when it has nothing to draw, so the page can say "not run".

Every figure uses constrained layout (titles never run into the labels of the panel above), and `to_png`
checks what it can before saving: a panel with nothing drawn, or text of one panel overlapping text of another,
is reported as a `LayoutWarning` (the tests turn it into an error).

Example::

    >>> b64 = diversity_figure([("base", 1.5, 2.0)], "humaneval")      # 'iVBORw0KGgo...'
    >>> html = f'<img src="data:image/png;base64,{b64}">'
"""

from __future__ import annotations

import base64
import io
import os
import warnings

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorascope.evals.catalog import MetricSpec, spec

from .compare import Point, axis
from .frontier import pareto_front

DPI = 90


class LayoutWarning(UserWarning):
    """A figure has a blank panel or overlapping text."""


def new_figure(w: float, h: float) -> Figure:
    return Figure(figsize=(w, h), layout="constrained")


def _texts(ax) -> list:
    """The text of one panel that another panel's text must never cover: title, axis labels, and the labels of
    the ticks inside the view (matplotlib keeps labels of ticks outside it, undrawn)."""
    out = [ax.title, ax.xaxis.label, ax.yaxis.label]
    for ax_ in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(ax_.get_view_interval())
        out += [t.label1 for t in ax_.get_major_ticks() if lo <= t.get_loc() <= hi]
    return [t for t in out if t.get_visible() and t.get_text()]


def _blank(ax, renderer) -> bool:
    """Nothing drawn in the panel: no line, collection or image, and no patch with an area (a bar chart whose
    every bar is 0 has patches, all of height 0)."""
    if ax.lines or ax.collections or ax.images:
        return False
    return not any((b := p.get_window_extent(renderer)).width > 0 and b.height > 0 for p in ax.patches)


def layout_problems(fig: Figure) -> list[str]:
    """Blank panels and text of one panel overlapping text of another, after drawing the figure."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    out = [f"panel '{a.get_title()}' is blank" for a in axes if _blank(a, r)]
    boxes = [(i, t.get_text(), t.get_window_extent(r)) for i, a in enumerate(axes) for t in _texts(a)]
    for j, (i, ta, ba) in enumerate(boxes):
        for k, tb, bb in boxes[j + 1 :]:
            if k != i and ba.overlaps(bb):
                out.append(f"'{ta}' overlaps '{tb}'")
    return out


def to_png(fig: Figure) -> str:
    for problem in layout_problems(fig):
        warnings.warn(problem, LayoutWarning, stacklevel=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def short_task(task: str) -> str:
    """A task name short enough for a panel title: heldout_bpb:/long/path/code.jsonl -> heldout_bpb:code.jsonl."""
    head, sep, tail = task.partition(":")
    return f"{head}:{os.path.basename(tail.rstrip('/')) or tail}" if sep else task


def outside_legend(ax, **kw) -> None:
    """The legend right of the panel, where it covers no data (constrained layout makes room for it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


def colors(names: list[str]) -> dict[str, tuple]:
    """One stable colour per curve name, shared by every figure of a setting."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(sorted(set(names)))}


def _grid(n: int, w: float = 4.2, h: float = 3.2) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = new_figure(w * cols, h * rows)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def role_keys(ps: list[Point], role: str) -> list[tuple[str, str]]:
    """(task, headline metric) of every task of `role` (learning or forgetting) evaluated on these points."""
    return sorted({(t, m) for p in ps for (t, m) in p.values if (s := spec(t)) and s.role == role and s.metric == m})


def curves_figure(ps: list[Point], base: dict, specs: list[tuple[str, str]]) -> str | None:
    """One panel per (task, metric): the metric vs tokens/epochs, a line per configuration with stderr error
    bars, the base model as a dashed line."""
    if not ps or not specs:
        return None
    by = axis(ps)
    col = colors([p.name for p in ps])
    fig, axes = _grid(len(specs))
    for ax, (task, metric) in zip(axes, specs):
        for name in sorted({p.name for p in ps}):
            pts = sorted(
                (p for p in ps if p.name == name and (task, metric) in p.values and p.position(by) is not None),
                key=lambda p: p.position(by),
            )
            if pts:
                ax.errorbar(
                    [p.position(by) for p in pts],
                    [p.values[(task, metric)][0] for p in pts],
                    yerr=[p.values[(task, metric)][1] or 0 for p in pts],
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=col[name],
                    label=name,
                )
        if (task, metric) in base:
            ax.axhline(base[(task, metric)][0], ls="--", color="black", lw=1, label="base")
        s = spec(task)
        ax.set_title(f"{short_task(task)} {metric} ({'↑' if s.higher_better else '↓'} better)", fontsize=9)
        ax.set_xlabel(by)
        ax.grid(alpha=0.3)
    handles = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside lower center", ncol=min(4, len(handles)))
    return to_png(fig)


def spans_axis(ivs: list, lo: float, hi: float, share: float = 0.8) -> bool:
    """Every interval includes 0 and the widest covers most of the axis: the panel resolves nothing (a
    zero-width interval on a handful of items says no more than a wide one)."""
    ivs = [iv for iv in ivs if iv is not None]
    return (
        bool(ivs)
        and hi > lo
        and all(iv.lo <= 0 <= iv.hi for iv in ivs)
        and max(iv.hi - iv.lo for iv in ivs) >= share * (hi - lo)
    )


def forest_figure(panels: list[dict]) -> tuple[str | None, list[str]]:
    """Dot-and-interval panels, one per task: each configuration's difference vs the base model (the dashed
    line at 0), with its 95% interval. `panels`: {"title", "xlabel", "rows": [(name, Interval | None)]}.
    Returns (png, notes): a note for each panel that resolves nothing (see spans_axis)."""
    panels = [p for p in panels if any(iv is not None for _, iv in p["rows"])]
    if not panels:
        return None, []
    n = max(len(p["rows"]) for p in panels)
    cols = min(len(panels), 2)
    nrows = (len(panels) + cols - 1) // cols
    fig = new_figure(5.6 * cols, (1.2 + 0.38 * n) * nrows)
    notes = []
    for i, p in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        rows = [(name, iv) for name, iv in p["rows"] if iv is not None]
        ys = list(range(len(rows)))[::-1]  # first configuration on top
        ax.errorbar(
            [iv.estimate for _, iv in rows],
            ys,
            xerr=[[iv.estimate - iv.lo for _, iv in rows], [iv.hi - iv.estimate for _, iv in rows]],
            ls="none",
            marker="o",
            ms=5,
            capsize=3,
            color="tab:blue",
        )
        ax.axvline(0, ls="--", color="black", lw=1)
        ax.set_yticks(ys, [name for name, _ in rows], fontsize=8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(p["title"], fontsize=9)
        ax.set_xlabel(p["xlabel"], fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        if spans_axis([iv for _, iv in rows], *ax.get_xlim()):
            items = {iv.n for _, iv in rows if iv.n}
            notes.append(
                f"{p['title']}: every interval includes 0 and the widest spans most of the axis"
                + (f" (only {max(items)} items)" if items else "")
                + ", so this panel tells nothing apart; evaluate more items."
            )
    return to_png(fig), notes


def _loss_by_step(run: dict) -> dict[int, tuple[int, float]]:
    """step -> (tokens, loss) of a run's loss.jsonl (the last record of a step wins after a resume)."""
    return {x["step"]: (x["tokens"], x["loss"]) for x in run["loss"] if isinstance(x.get("loss"), (int, float))}


def smooth(ys: list[float], window: int) -> list[float]:
    """Centred moving average (shorter at the ends), so batch-to-batch noise does not hide the trend."""
    h = window // 2
    return [sum(ys[max(0, i - h) : i + h + 1]) / len(ys[max(0, i - h) : i + h + 1]) for i in range(len(ys))]


def reference_run(run: dict, runs: list[dict]) -> dict | None:
    """The full-FT run that saw the same batches as `run` (same seed: the data order depends on seed and step
    only), the lowest final loss among several; None for a full-FT run or when there is none."""
    if run["family"] == "full":
        return None
    same = [
        r
        for r in runs
        if r["family"] == "full" and r.get("seed") == run.get("seed") and not r["diverged"] and _loss_by_step(r)
    ]
    return min(same, key=lambda r: _loss_by_step(r)[max(_loss_by_step(r))][1], default=None)


def loss_figure(runs: list[dict]) -> tuple[str | None, str | None]:
    """Left: training loss vs tokens, smoothed, a line per run. Right: each run's loss minus the loss of the
    full-FT run with the same seed at the same step (same batches), so the methods' difference is not buried
    under the batch-to-batch swings every run shares. Returns (png, caption)."""
    runs = [r for r in runs if _loss_by_step(r)]
    if not runs:
        return None, None
    window = max(1, max(len(_loss_by_step(r)) for r in runs) // 20)
    refs = {r["run_id"]: ref for r in runs if (ref := reference_run(r, runs))}
    fig = new_figure(11 if refs else 6.5, 3.6)
    axes = [fig.add_subplot(1, 2 if refs else 1, i + 1) for i in range(2 if refs else 1)]
    col = colors([r["label"] for r in runs])
    for r in runs:
        steps = sorted(_loss_by_step(r))
        pts = [_loss_by_step(r)[s] for s in steps]
        axes[0].plot(
            [t for t, _ in pts],
            smooth([y for _, y in pts], window),
            color=col[r["label"]],
            lw=1.2,
            label=r["label"] + (" (diverged)" if r["diverged"] else ""),
        )
        if r["run_id"] in refs:
            ref = _loss_by_step(refs[r["run_id"]])
            common = [s for s in steps if s in ref]
            axes[1].plot(
                [ref[s][0] for s in common],
                smooth([_loss_by_step(r)[s][1] - ref[s][1] for s in common], window),
                color=col[r["label"]],
                lw=1.2,
            )
    axes[0].set(xlabel="tokens", ylabel="training loss")
    axes[0].set_title("training loss" + (f" ({window}-step moving average)" if window > 1 else ""), fontsize=9)
    if refs:
        axes[1].axhline(0, ls="--", color="black", lw=1)
        axes[1].set(xlabel="tokens", ylabel="loss − full FT's loss")
        axes[1].set_title("minus full FT on the same batches (> 0: higher loss)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="outside lower center", ncol=min(3, len(runs)))
    cap = None
    if refs:
        cap = (
            "Right: "
            + "; ".join(
                sorted({f"{r['label']} minus {refs[r['run_id']]['label']}" for r in runs if r["run_id"] in refs})
            )
            + " (same seed, so the same batches at each step)."
        )
    return to_png(fig), cap


def pareto_figure(ps: list[Point], base: dict, L: MetricSpec, F: MetricSpec) -> str | None:
    """Learning (y) vs forgetting metric (x), one point per configuration x checkpoint, each family's frontier."""
    lk, fk = (L.task, L.metric), (F.task, F.metric)
    pts = [p for p in ps if lk in p.values and fk in p.values and not p.diverged]
    if not pts:
        return None
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    col = colors([p.name for p in ps])
    for name in sorted({p.name for p in pts}):
        mine = [p for p in pts if p.name == name]
        ax.errorbar(
            [p.values[fk][0] for p in mine],
            [p.values[lk][0] for p in mine],
            xerr=[p.values[fk][1] or 0 for p in mine],
            yerr=[p.values[lk][1] or 0 for p in mine],
            ls="none",
            marker="o",
            ms=5,
            capsize=2,
            color=col[name],
            label=name,
        )
    fam_style = ["-", "--", ":", "-."]
    for i, fam in enumerate(sorted({p.family for p in pts})):
        # frontier in 'higher is better' coordinates, drawn back in the metrics' own units
        sx, sy = (1 if F.higher_better else -1), (1 if L.higher_better else -1)
        front = pareto_front([(sx * p.values[fk][0], sy * p.values[lk][0]) for p in pts if p.family == fam])
        if front:
            ax.plot(
                [sx * x for x, _ in front],
                [sy * y for _, y in front],
                fam_style[i % 4],
                color="gray",
                lw=1.5,
                label=f"{fam} frontier",
            )
    if lk in base and fk in base:
        ax.plot([base[fk][0]], [base[lk][0]], marker="*", ms=14, color="black", ls="none", label="base")
    # axes oriented like the paper's plot whatever the metric's direction: up = learned, right = kept
    if not L.higher_better:
        ax.invert_yaxis()
    if not F.higher_better:
        ax.invert_xaxis()
    ax.set_xlabel(f"{short_task(F.task)} {F.metric} (right = less forgetting)")
    ax.set_ylabel(f"{short_task(L.task)} {L.metric} (up = more learning)")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    return to_png(fig)


def truncation_figure(
    points_by_rank: list[tuple[str, dict]], base: dict, full: dict, specs: list[MetricSpec]
) -> str | None:
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
            ax.axhline(base[k][0], ls="--", color="black", lw=1, label="base (dashed)")
        ax.set_title(f"{short_task(s.task)} {s.metric} ({'↑' if s.higher_better else '↓'} better)", fontsize=9)
        ax.set_xlabel("rank kept")
        ax.grid(alpha=0.3)
    return to_png(fig)


def diversity_figure(rows: list[tuple[str, float, float]], task: str) -> str | None:
    """Mean unique completions per problem, passing and failing, per model (the paper's section 5)."""
    if not rows:
        return None
    fig = new_figure(max(5, 1.1 * len(rows)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="unique passing", color="tab:green")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="unique failing", color="tab:red")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{task}: unique completions / problem")
    outside_legend(ax)
    ax.grid(alpha=0.3, axis="y")
    return to_png(fig)
