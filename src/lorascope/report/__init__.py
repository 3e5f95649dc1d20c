"""The study report: STUDY/report.html (one offline page) and STUDY/results.parquet (the long table).

Reads files only (no torch), so it runs anywhere the study directory is copied, and is tolerant of a study
still running: what is absent is shown as "Not run".

Example::

    lorascope report studies/quick          # -> studies/quick/report.html

    >>> from lorascope.report import write_report
    >>> write_report(Path("studies/quick"))
    PosixPath('studies/quick/report.html')
"""

from __future__ import annotations

import os
import time
from html import escape
from pathlib import Path

from .collect import load_study_dir, metric_rows, write_parquet
from .compare import points
from .html import Page
from .sections import (cost_section, curves_section, diversity_section, headline_section, headlines,
                       pareto_section, provenance_section, spectrum_section)

__all__ = ["write_report"]


def write_report(study_dir: Path) -> Path:
    """Write STUDY_DIR/results.parquet and STUDY_DIR/report.html (atomically); return the html path."""
    from tqdm.auto import tqdm

    study_dir = Path(study_dir)
    st = load_study_dir(study_dir)
    rows = metric_rows(st)
    write_parquet(rows, study_dir / "results.parquet")
    ps = points(st, rows)
    hs = headlines(st, ps, rows)
    name = st.config.get("name") or study_dir.name
    page = Page(f"lorascope report: {name}")
    steps = [("headline", "Headline and recommendation", lambda: headline_section(st, hs)),
             ("curves", "Learning, forgetting and loss curves", lambda: curves_section(st, ps, rows)),
             ("pareto", "Learning vs forgetting", lambda: pareto_section(st, ps, rows, hs)),
             ("spectrum", "Spectrum of the weight update", lambda: spectrum_section(st, ps, rows, hs)),
             ("cost", "Cost", lambda: cost_section(st)),
             ("diversity", "Diversity of generations", lambda: diversity_section(st, ps, rows)),
             ("provenance", "Provenance", lambda: provenance_section(st))]
    for anchor, heading, build in tqdm(steps, desc="report", unit="section", leave=False):
        page.section(anchor, heading, build())
    base_model = st.config.get("model", "?")
    intro = (f"<p class=small>Base model {escape(str(base_model))}; {len(st.runs)} runs; "
             f"{sum(1 for r in st.runs if r['complete'])} complete; generated "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Error bars: stderr of each evaluation; differences carry 95% "
             "paired-bootstrap intervals over evaluation items (2000 resamples, seed 0).</p>")
    out = study_dir / "report.html"
    tmp = study_dir / f".report.html.{os.getpid()}.tmp"
    tmp.write_text(page.render(intro), encoding="utf-8")
    os.replace(tmp, out)
    return out
