"""What an unresolved verdict excludes and what it would take: planted numbers, bounds and prices by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lorascope.report.jobcosts import study_costs
from lorascope.report.records import Comparison
from lorascope.report.whatif import bounds, mde, token_trends, whatif_rows, whatif_text

TASK = "heldout_bpb:code-cpt"
RUN_S = {"train": 100.0, "eval": 20.0, "spectrum": 5.0}  # per run: 125 CPU-s at one core per job


def comparison(**kw) -> Comparison:
    base = dict(
        question="learns_less",
        setting="code-cpt",
        method="lora-r16",
        budget="tok-000000004096",
        metric=TASK,
        estimate=-0.002,
        ci_low=None,
        ci_high=None,
        ci_low_holm=None,
        ci_high_holm=None,
        p_value=0.5,
        p_holm=0.5,
        alpha_holm=0.05,
        margin=None,
        margin_source=None,
        verdict="not resolved",
        reason="",
        se=0.01,
        df=math.inf,
        reference_effect=0.1,
        n_seeds=2,
        n_clusters=8,
        n_clusters_eff=8.0,
        var_seed=1e-4,
        var_cluster=1e-4,
    )
    return Comparison(**{**base, **kw})


def write_study(d: Path, n_items: int = 64, limit: int = 64) -> Path:
    """Two main configurations x 2 seeds (plus one LR-search run), each job's time planted."""
    (d / "logs").mkdir(parents=True)
    (d / "study.yaml").write_text(yaml.safe_dump({"evals": {"groups": [{"tasks": [TASK], "limit": limit}]}}))
    runs, lines = [], []
    for m, seed in [("full", 0), ("full", 1), ("lora-r16", 0), ("lora-r16", 1), ("lora-r16", 9)]:
        rid = f"{m}-{seed}"
        role = "lr-search" if seed == 9 else "main"
        runs.append({"run_id": rid, "setting": "code-cpt", "method_name": m, "lr": 1e-3, "budget": None, "role": role})
        lines += [
            {"job": f"train:{rid}", "rc": 0, "elapsed_s": RUN_S["train"]},
            {"job": f"eval:{rid}:tok-000000004096", "rc": 0, "elapsed_s": RUN_S["eval"]},
            {"job": f"spectrum:{rid}:tok-000000004096", "rc": 0, "elapsed_s": RUN_S["spectrum"]},
        ]
        ev = d / "evals" / rid / "tok-000000004096"
        ev.mkdir(parents=True)
        (ev / "results.json").write_text(json.dumps({"tasks": {TASK: {"n": n_items, "elapsed_s": n_items * 0.25}}}))
    (d / "evals" / "base").mkdir()
    (d / "evals" / "base" / "results.json").write_text(
        json.dumps({"tasks": {TASK: {"n": n_items, "elapsed_s": n_items * 0.25}}})
    )
    lines.append({"job": "train:broken", "rc": 1, "elapsed_s": 999.0})  # a failed job prices nothing
    lines.insert(0, {"job": "train:full-0", "rc": 0, "elapsed_s": 500.0})  # a job run again counts its last run
    (d / "logs" / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "runs.json").write_text(json.dumps(runs))
    return d


def test_costs_come_from_the_job_log(tmp_path):
    c = study_costs(write_study(tmp_path))
    assert c.per_seed_s() == pytest.approx(2 * sum(RUN_S.values()))  # 2 main configurations, LR search excluded
    assert c.item_s[TASK] == pytest.approx(0.25)
    assert c.eval_dirs[TASK] == 5  # 4 main runs + the base model (the LR-search run keeps its evaluation)
    assert c.reeval_s(TASK, 128) == pytest.approx(128 * 0.25 * 5)
    assert not c.cores_known


def test_bound_is_the_tested_interval_relative_to_full_ft(tmp_path):
    c = comparison(ci_low_holm=-0.008, ci_high_holm=0.012)
    (row,) = whatif_rows([c], write_study(tmp_path))
    assert row["bound_low_pct"] == pytest.approx(-0.08) and row["bound_high_pct"] == pytest.approx(0.12)
    text = whatif_text(row)
    assert "more than 8% less" in text and "more than 12% more" in text


def test_bound_without_an_interval_uses_se_at_the_holm_level():
    c = comparison(estimate=-0.002, se=0.01, df=math.inf, alpha_holm=0.025)
    lo, hi = bounds(c)
    assert lo == pytest.approx(-0.002 - 2.241403 * 0.01, abs=1e-6)  # z_{1-0.0125}
    assert hi == pytest.approx(-0.002 + 2.241403 * 0.01, abs=1e-6)


def test_mde_at_the_holm_level_with_t():
    assert mde(0.01, math.inf, 0.05) == pytest.approx((1.959964 + 0.841621) * 0.01, abs=1e-6)
    assert mde(0.01, 4.0, 0.05) == pytest.approx((2.776445 + 0.940965) * 0.01, abs=1e-4)
    assert mde(0.01, 4.0, 0.01) > mde(0.01, 4.0, 0.05)  # a stricter Holm level needs a larger effect


def test_seed_noise_calls_for_seeds_and_cluster_noise_for_clusters(tmp_path):
    d = write_study(tmp_path)
    seedy = comparison(var_seed=1e-3, var_cluster=1e-6)
    clustery = comparison(var_seed=1e-6, var_cluster=1e-3)
    rs, rc = whatif_rows([seedy, clustery], d)
    assert rs["targets"][2]["met"] and rc["targets"][2]["met"]  # 50%: 0.05, beyond today's MDE of 0.028
    t_s, t_c = rs["targets"][0], rc["targets"][0]  # 10%: 0.01
    assert t_s["clusters_only"] is None and t_s["seeds_only"] is not None
    assert t_c["seeds_only"] is None and t_c["clusters_only"] is not None
    assert t_s["cheapest"]["n_seeds"] > 2 and t_c["cheapest"]["items"] > 64


def test_a_plan_reaches_its_target_and_is_priced_from_the_log(tmp_path):
    c = comparison(var_seed=1e-3, var_cluster=1e-6, se=0.02)
    (row,) = whatif_rows([c], write_study(tmp_path))
    for t in row["targets"]:
        s = t["seeds_only"]
        if s is None:
            continue
        # the record's parts are the estimate's at 2 seeds and 8 clusters: one seed's variance is 2e-3
        se = 0.02 * math.sqrt((2e-3 / s["n_seeds"] + 1e-6) / (1e-3 + 1e-6))
        assert (1.959964 + 0.841621) * se <= t["effect"]  # enough, and one seed fewer is not
        se_less = 0.02 * math.sqrt((2e-3 / (s["n_seeds"] - 1) + 1e-6) / (1e-3 + 1e-6))
        assert s["n_seeds"] == 2 or (1.959964 + 0.841621) * se_less > t["effect"]
        assert s["cpu_h"] == pytest.approx((s["n_seeds"] - 2) * 250 / 3600)
    smaller = [t["seeds_only"]["n_seeds"] for t in row["targets"] if t["seeds_only"]]
    assert smaller == sorted(smaller, reverse=True)  # a larger target needs fewer seeds


def test_an_exhausted_pool_caps_the_item_lever(tmp_path):
    d = write_study(tmp_path, n_items=40, limit=64)  # fewer items scored than the limit: the pool is spent
    (row,) = whatif_rows([comparison(var_seed=1e-6, var_cluster=1e-3)], d)
    assert not row["targets"][0]["met"]
    assert all(t["clusters_only"] is None for t in row["targets"])
    assert "pool is exhausted" in whatif_text(row)
    (derived,) = whatif_rows([comparison(metric="forgetting_mean", var_seed=1e-6, var_cluster=1e-3)], d)
    assert all(t["clusters_only"] is None for t in derived["targets"])
    assert "no eval group scores it" in whatif_text(derived)
    (d / "evals" / "base" / "results.json").write_text(json.dumps({"tasks": {TASK: {"n": 40}}}))
    for f in (d / "evals").glob("*/*/results.json"):
        f.write_text(json.dumps({"tasks": {TASK: {"n": 64}}}))  # no elapsed_s: more items cannot be priced
    (unpriced,) = whatif_rows([comparison(var_seed=1e-6, var_cluster=1e-3)], d)
    assert all(t["clusters_only"] is None for t in unpriced["targets"]) and "no time per item" in whatif_text(unpriced)


def test_only_unresolved_comparisons_get_rows(tmp_path):
    rows = whatif_rows(
        [comparison(verdict="yes"), comparison(), comparison(verdict="equivalent")], write_study(tmp_path)
    )
    assert [r["index"] for r in rows] == [1]


def test_tokens_only_where_the_gap_grows_with_the_budget(tmp_path):
    d = write_study(tmp_path)
    grows = [
        comparison(budget=f"tok-{t:012d}", estimate=-0.005 * k, se=0.002)
        for k, t in enumerate([4096, 8192, 16384, 32768])
    ]
    flat = [
        replace(c, method="lora-r64", estimate=e) for c, e in zip(grows, [-0.001, 0.002, -0.002, 0.001], strict=True)
    ]
    trends = token_trends(grows + flat)
    assert trends[("learns_less", "code-cpt", "lora-r16", TASK)]["supported"]
    assert not trends[("learns_less", "code-cpt", "lora-r64", TASK)]["supported"]
    rows = whatif_rows(grows + flat, d)
    first = next(r for r in rows if r["method"] == "lora-r16" and r["budget"] == "tok-000000004096")
    assert first["tokens"]["supported"] and first["tokens"]["tokens"] > 4096
    assert not next(r for r in rows if r["method"] == "lora-r64")["tokens"]["supported"]
