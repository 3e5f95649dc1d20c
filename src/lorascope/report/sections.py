"""The sections of the report, each built from the study's files; a section with no data says "Not run".

Example::

    >>> st = load_study_dir(Path("studies/quick")); rows = metric_rows(st); ps = points(st, rows)
    >>> body = cost_section(st)      # an HTML <table> string
"""

from __future__ import annotations

import json

from .collect import Study, result_metrics
from .compare import Headline, Point, base_values, finals, headline, vs_full_table
from .figures import curves_figure, diversity_figure, loss_figure, pareto_figure, truncation_figure
from .html import img, not_run, para, pre, table
from .metrics import spec
from .spectra import by_module_figure, heatmap_figure, intruders_figure, last_spectra, trajectory_figure


def settings_of(st: Study) -> list[tuple[str, str | None]]:
    """(setting name, dataset) in study order."""
    seen: dict[str, str | None] = {}
    for r in st.runs:
        seen.setdefault(r.get("setting"), r.get("dataset"))
    return list(seen.items())


def _iv(iv) -> str:
    return "–" if iv is None else iv.text() + (" *" if iv.significant else "")


def headline_section(st: Study, hs: list[Headline]) -> str:
    if not st.runs:
        return not_run("the study has no runs (runs.json is missing or empty).")
    out = []
    for h in hs:
        out.append(f"<h3>{h.setting}</h3>")
        for s in h.sentences:
            out.append(para(s, "rec" if s.startswith("Recommended") else None))
        if h.table and h.learning:
            rows = []
            for r in sorted(h.table, key=lambda r: -(r["learning"].estimate if r["learning"] else float("inf"))):
                p: Point = r["point"]
                n = r["learning"].n if r["learning"] else None
                rows.append([p.name, p.family, p.checkpoint, len(p.run_ids), _iv(r["learning"]),
                             _iv(r["forgetting"]), n, r["learning"].method if r["learning"] else None,
                             "diverged" if p.diverged else ""])
            out.append(table(["configuration", "family", "checkpoint", "seeds",
                              f"learning ({h.learning.task})",
                              f"forgetting ({h.forgetting.task if h.forgetting else 'none'})", "items", "interval",
                              ""], rows,
                             "Differences vs the base model, signed so that positive = learned / forgot; "
                             "[95% interval]; * = interval excludes 0."))
    return "".join(out)


def curves_section(st: Study, ps: list[Point], rows: list[dict]) -> str:
    base = base_values(rows)
    out = []
    for setting, _ in settings_of(st):
        mine = [p for p in ps if p.setting == setting]
        out.append(f"<h3>{setting}</h3>")
        out.append("<h4>Learning</h4>" + img(curves_figure(mine, base, "learning"), f"learning curves {setting}",
                                               "no learning task was evaluated on this setting's checkpoints."))
        out.append("<h4>Forgetting</h4>" + img(curves_figure(mine, base, "forgetting"),
                                                f"forgetting curves {setting}",
                                                "no forgetting task was evaluated on this setting's checkpoints."))
        out.append("<h4>Training loss</h4>" + img(loss_figure([r for r in st.runs if r.get("setting") == setting]),
                                                   f"loss {setting}", "no loss.jsonl in this setting's runs."))
        tab = vs_full_table(st, ps, rows, setting)
        if tab:
            out.append("<h4>Every metric at the last checkpoint</h4>" + table(
                ["configuration", "task", "metric", "value", "stderr", "seed sd", "seeds", "vs base", "vs best full FT"],
                [[r["point"].name, r["spec"].task, r["spec"].metric, r["value"], r["stderr"], r["seed_sd"],
                  r["n_seeds"], _iv(r["vs_base"]), _iv(r["vs_full"])] for r in tab],
                "vs base / vs full FT: signed learning (learning tasks) or forgetting (forgetting tasks), "
                "[95% paired bootstrap over items, or normal approx. from stderr when samples are absent]; "
                "* = excludes 0."))
    return "".join(out) if out else not_run("no settings.")


def pareto_section(st: Study, ps: list[Point], rows: list[dict], hs: list[Headline]) -> str:
    base = base_values(rows)
    out = []
    for h in hs:
        out.append(f"<h3>{h.setting}</h3>")
        if h.learning is None or h.forgetting is None:
            out.append(not_run("needs both a learning and a forgetting task evaluated on the base and the runs."))
            continue
        out.append(img(pareto_figure([p for p in ps if p.setting == h.setting], base, h.learning, h.forgetting),
                       f"pareto {h.setting}", "no checkpoint has both metrics."))
    return "".join(out) if out else not_run("no settings.")


def spectrum_section(st: Study, ps: list[Point], rows: list[dict], hs: list[Headline]) -> str:
    latest = last_spectra(st)
    out = []
    if not latest:
        out.append(not_run("no analysis/<run>/<checkpoint>/spectrum.json (enable analysis.spectrum)."))
    else:
        items = [(st.run(r)["label"], sp) for r, sp in latest.items()]
        out.append(para("Rank of dW = W_tuned - W_base at the energy fraction (smallest k whose top-k singular "
                        "values hold that share of sum(s^2)), next to an i.i.d. Gaussian matrix of the same shape."))
        out.append(img(heatmap_figure(items), "rank heatmap", "no per-layer records."))
        out.append(img(by_module_figure(items), "rank by module", "no module aggregates."))
        out.append(img(trajectory_figure(st), "rank over training", "each run was analysed at one checkpoint only "
                                                                     "(set analysis.spectrum.checkpoints: all)."))
        out.append("<h4>Intruder dimensions</h4>" + img(intruders_figure(items), "intruders", "no intruder counts."))
        trows = []
        for name, sp in items:
            for mod, a in sp["aggregate"]["by_module"].items():
                trows.append([name, sp.get("checkpoint"), mod, a.get("n"), a.get("delta_rank_at_energy"),
                              a.get("gaussian_rank_at_energy"), a.get("delta_rank_fraction"),
                              a.get("delta_rank_over_lora_rank"), a.get("intruders_total")])
        out.append(table(["run", "checkpoint", "module", "matrices", "rank of dW", "Gaussian", "fraction of full",
                          "/ LoRA rank", "intruders"], trows))
    out.append("<h4>Truncation: does full FT need its high-rank dW?</h4>")
    tr = _truncation(st, ps, rows, hs)
    out.append(tr or not_run("no evaluated rank-r truncations (analysis.truncate with evaluate: true)."))
    return "".join(out)


def _truncation(st: Study, ps: list[Point], rows: list[dict], hs: list[Headline]) -> str:
    base = base_values(rows)
    out = []
    for rid in sorted({r for r, _ in st.truncations}):
        run = st.run(rid)
        ranks = []
        for (r, name), doc in st.truncations.items():
            res = st.evals.get((rid, f"truncate-{name}"))
            if r == rid and res:
                ranks.append((name, {(t, m): (v, se) for t, m, v, se in result_metrics(res)}))
        if not ranks:
            continue
        ranks.sort(key=lambda x: (not x[0][1:].isdigit(), int(x[0][1:]) if x[0][1:].isdigit() else 0))
        src = st.truncations[(rid, ranks[0][0])].get("checkpoint", "")
        full = {k: v[:2] for p in ps if rid in p.run_ids and p.checkpoint == src for k, v in p.values.items()}
        h = next((h for h in hs if h.setting == run.get("setting")), None)
        specs = [s for s in (h.learning, h.forgetting) if s] if h else []
        for t in sorted({t for _, v in ranks for t, _ in v}):
            if spec(t) and spec(t) not in specs:
                specs.append(spec(t))
        out.append(f"<p>{run['label']} ({src})</p>")
        out.append(img(truncation_figure(ranks, base, full, specs), f"truncation {rid}", "no metrics."))
    return "".join(out)


def cost_section(st: Study) -> str:
    rows = []
    for r in st.runs:
        s = r.get("summary") or {}
        tr, tot = s.get("trainable_parameters"), s.get("total_parameters")
        status = "diverged" if r["diverged"] else "complete" if r["complete"] else "incomplete"
        rows.append([r.get("label"), (r.get("method") or {}).get("kind"), tr, tot,
                     f"{100 * tr / tot:.3g}%" if tr and tot else None, s.get("tokens"), s.get("tokens_per_s"),
                     s["peak_memory_bytes"] / 2 ** 30 if s.get("peak_memory_bytes") else None,
                     s["checkpoint_size_bytes"] / 2 ** 20 if s.get("checkpoint_size_bytes") else None,
                     s.get("final_loss"), s.get("precision"), s.get("processes"), status])
    if not any(r.get("summary") for r in st.runs):
        return not_run("no run has a summary.json yet.")
    return table(["run", "kind", "trainable params", "total params", "trainable", "tokens", "tokens/s",
                  "peak memory (GiB)", "checkpoint (MiB)", "final loss", "precision", "processes", "status"], rows,
                 "Peak memory: GPU max allocated, or the process's peak RSS on CPU. Checkpoint: the final "
                 "checkpoint's files (adapter only for LoRA).")


def diversity_section(st: Study, ps: list[Point], rows: list[dict]) -> str:
    out = []
    base = base_values(rows)
    for task in ("humaneval", "mbpp"):
        items = []
        if (task, "unique_passed_mean") in base:
            items.append(("base", base[(task, "unique_passed_mean")][0], base[(task, "unique_failed_mean")][0]))
        for setting, _ in settings_of(st):
            for p in finals([q for q in ps if q.setting == setting]):
                if (task, "unique_passed_mean") in p.values:
                    items.append((f"{setting}: {p.name}", p.values[(task, "unique_passed_mean")][0],
                                  p.values[(task, "unique_failed_mean")][0]))
        if items:
            out.append(f"<h3>{task}</h3>" + img(diversity_figure(items, task), f"diversity {task}", ""))
            out.append(table(["model", "unique passing / problem", "unique failing / problem"],
                             [list(i) for i in items]))
    return "".join(out) or not_run("no HumanEval/MBPP samples (the diversity measure needs several samples "
                                   "per problem).")


def provenance_section(st: Study) -> str:
    out = ["<h3>Software and hardware</h3>"]
    keys = ("python", "platform", "cpu_count", "gpu", "torch", "transformers", "peft", "accelerate", "processes")
    metas = [(r["label"], r["meta"]) for r in st.runs if r.get("meta")]
    distinct: dict[tuple, list[str]] = {}
    for label, m in metas:
        distinct.setdefault(tuple(m.get(k) for k in keys), []).append(label)
    if distinct:
        out.append(table(["runs", *keys], [[", ".join(v) if len(v) < 4 else f"{len(v)} runs", *k]
                                            for k, v in distinct.items()]))
    else:
        out.append(not_run("no meta.json in any run."))
    if st.base and st.base.get("versions"):
        out.append(para("Base model evaluation: " + ", ".join(f"{k} {v}" for k, v in st.base["versions"].items())))
    out.append("<h3>Data</h3>")
    mans: dict[str, tuple[dict, list[str]]] = {}
    for r in st.runs:
        if r.get("manifest"):
            key = r["manifest"].get("content_hash") or json.dumps(r["manifest"], sort_keys=True)
            mans.setdefault(key, (r["manifest"], []))[1].append(r.get("setting"))
    if mans:
        rows = []
        for m, settings in mans.values():
            dec = m.get("decontamination") or {}
            dropped = {k: v for k, v in {**(dec.get("dropped_train") or {}),
                                         **{f"heldout:{a}": b for a, b in (dec.get("dropped_heldout") or {}).items()}
                                         }.items() if v}
            rows.append([m.get("name"), m.get("regime"), ", ".join(sorted({s for s in settings if s})),
                         "; ".join(f"{s.get('name')} ({s.get('licence')})" for s in m.get("sources", [])),
                         json.dumps(m.get("documents")), json.dumps(m.get("tokens")), m.get("content_hash"),
                         f"{dec.get('rule', '–')}; dropped {json.dumps(dropped) if dropped else 'none'}",
                         json.dumps({k: len(v) for k, v in (m.get("excluded_eval_ids") or {}).items()})])
        out.append(table(["dataset", "regime", "settings", "sources (licence)", "documents", "tokens",
                          "content hash", "decontamination", "excluded eval items"], rows))
    else:
        out.append(not_run("no data_manifest.json in any run."))
    out.append("<h3>Commands</h3>")
    cmds = [c for c in st.commands.splitlines() if c.strip()]
    run_cmds = sorted({r["meta"].get("command") for r in st.runs if r.get("meta") and r["meta"].get("command")})
    out.append(pre("\n".join(cmds) or "(no commands.txt)") +
               (para("Training processes ran:") + pre("\n".join(run_cmds)) if run_cmds else ""))
    out.append("<h3>Resolved study.yaml</h3>" + (pre(st.study_yaml) if st.study_yaml else not_run("no study.yaml.")))
    out.append("<h3>Runs</h3>" + table(["run id", "label", "setting", "method", "lr", "seed"],
                                       [[r["run_id"], r.get("label"), r.get("setting"),
                                         json.dumps(r.get("method"), sort_keys=True), r.get("lr"), r.get("seed")]
                                        for r in st.runs]))
    return "".join(out)


def headlines(st: Study, ps: list[Point], rows: list[dict]) -> list[Headline]:
    return [headline(st, ps, rows, s, d) for s, d in settings_of(st)]
