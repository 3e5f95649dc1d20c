"""``lm_eval:<task>``: lm-eval's own evaluator on the loaded model, per-item results in lorascope's samples format.

A custom YAML task over local JSON lines (no hub) runs on the tiny random Llama; lm-eval's ARC-Easy config,
pointed at the shipped ARC-Easy test items, agrees item for item with lorascope's native ``arc_easy``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lorascope.errors import LorascopeError  # noqa: E402
from lorascope.evals import registry  # noqa: E402
from lorascope.evals.api import evaluate  # noqa: E402
from lorascope.evals.catalog import spec  # noqa: E402
from lorascope.evals.results import read_samples  # noqa: E402
from lorascope.layout import samples_filename  # noqa: E402
from lorascope.splits import split_of  # noqa: E402

QUESTIONS = [
    (f"What is {a} plus {b}?", [str(a + b), str(a + b + 1), str(a * b + 3)], 0) for a in range(3) for b in range(4)
]


def _write_task(d: Path, name: str, higher_is_better: bool = True) -> None:
    data = d / f"{name}.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "choices": c, "label": g}) + "\n"
            for i, (q, c, g) in enumerate(QUESTIONS)
        )
    )
    (d / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n"
        f"  - metric: acc\n    aggregation: mean\n    higher_is_better: {str(higher_is_better).lower()}\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture()
def task_dir(tmp_path, monkeypatch):
    d = tmp_path / "tasks"
    d.mkdir()
    _write_task(d, "addition")
    _write_task(d, "addition_lower", higher_is_better=False)
    monkeypatch.setenv("LORASCOPE_LM_EVAL_INCLUDE", str(d))
    return d


def test_custom_yaml_task_writes_lorascope_samples(task_dir, tiny_model, tokenizer, tmp_path, one_thread):
    name = "lm_eval:addition@learning"
    res = evaluate(tiny_model, [name], tmp_path / "ev", tokenizer=tokenizer, batch_size=4, progress=False)
    rec = res["tasks"][name]
    samples = read_samples(tmp_path / "ev" / "samples" / samples_filename(name))
    assert [s["id"] for s in samples] == [f"q{i}" for i in range(len(QUESTIONS))]
    for s, (_, _, gold) in zip(samples, QUESTIONS):
        assert s["cluster"] == f"lm_eval:addition/{s['id']}" and s["split"] == split_of(s["cluster"])
        lls = s["loglikelihoods"]
        assert s["acc"] == float(lls.index(max(lls)) == gold)  # lm-eval's per-item acc, from its own scores
    accs = [s["acc"] for s in samples]
    assert rec["metrics"]["acc,none"] == pytest.approx(sum(accs) / len(accs))
    assert rec["info"]["harness_results"]["acc,none"] == pytest.approx(rec["metrics"]["acc,none"])
    for split in ("validation", "test"):
        part = [s["acc"] for s in samples if s["split"] == split]
        assert rec["by_split"][split]["n"] == len(part)
        if part:
            assert rec["by_split"][split]["acc,none"] == pytest.approx(sum(part) / len(part))


def test_metric_direction_and_role_come_from_config_and_name(task_dir):
    s = spec("lm_eval:addition@forgetting")
    assert (s.metric, s.higher_better, s.role, s.item_field) == ("acc,none", True, "forgetting", "acc")
    assert spec("lm_eval:addition_lower@learning").higher_better is False  # read from the YAML's metric_list
    assert spec("lm_eval:addition") is None  # no role: evaluated, but no headline candidate


@pytest.mark.parametrize("name", ["lm_eval:no_such_task_xyz", "lm_eval:addition@sideways", "lm_eval"])
def test_bad_lm_eval_names_are_user_errors(task_dir, name):
    with pytest.raises(LorascopeError):
        registry.build(name)


def _arc_easy_yaml(d: Path, n: int) -> None:
    """lm-eval's own arc_easy config, reading the shipped ARC-Easy test items (hub layout) from a local file."""
    import lm_eval

    from lorascope import benchdata

    rows = []
    for it in benchdata.arc("ARC-Easy", "test")[:n]:
        labels = it.get("choice_labels") or [chr(65 + i) for i in range(len(it["choices"]))]
        rows.append(
            {
                "id": it["id"],
                "question": it["question"],
                "answerKey": labels[it["gold"]],
                "choices": {"text": it["choices"], "label": labels},
            }
        )
    (d / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    (d / "local_arc_easy.yaml").write_text(
        f"include: {base}\ntask: local_arc_easy\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'arc.jsonl'}\ntraining_split: null\nvalidation_split: null\n"
    )


def test_lm_eval_arc_easy_agrees_with_native_item_for_item(tmp_path, monkeypatch, tiny_model, tokenizer, one_thread):
    n = 24
    d = tmp_path / "tasks"
    d.mkdir()
    _arc_easy_yaml(d, n)
    monkeypatch.setenv("LORASCOPE_LM_EVAL_INCLUDE", str(d))
    name = "lm_eval:local_arc_easy@forgetting"
    res = evaluate(
        tiny_model, ["arc_easy", name], tmp_path / "ev", tokenizer=tokenizer, limit=n, batch_size=4, progress=False
    )
    native = {s["id"]: s for s in read_samples(tmp_path / "ev" / "samples" / samples_filename("arc_easy"))}
    harness = {s["id"]: s for s in read_samples(tmp_path / "ev" / "samples" / samples_filename(name))}
    assert len(native) == n and native.keys() == harness.keys()
    for i, ours in native.items():
        theirs = harness[i]
        assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"]), i
        assert max(abs(a - b) for a, b in zip(theirs["loglikelihoods"], ours["loglikelihoods"])) < 1e-3, i
    for key in ("acc,none", "acc_norm,none"):
        assert res["tasks"][name]["metrics"][key] == pytest.approx(res["tasks"]["arc_easy"]["metrics"][key])
    assert not math.isnan(res["tasks"][name]["metrics"]["acc_norm,none"])


def test_lm_eval_task_is_a_study_headline_metric(task_dir, tmp_path, tiny_model_dir, one_thread):
    """A tiny study whose learning metric is the custom lm-eval task: the report's headline reads it from the
    test split and states its verdicts."""
    import yaml

    from lorascope.report import write_report
    from lorascope.report.collect import load_study_dir, metric_rows
    from lorascope.report.compare import points
    from lorascope.report.sections import headlines
    from lorascope.study.scheduler import run_study

    corpus = tmp_path / "code.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"def f{i}(a):\n    return a + {i}\n" * 8}) + "\n" for i in range(60))
    )
    task = "lm_eval:addition@learning"
    cfg = tmp_path / "study.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-lm-eval",
                "model": str(tiny_model_dir),
                "seeds": [0],
                "settings": [
                    {
                        "name": "cpt",
                        "data": {"dataset": str(corpus)},
                        "train": {"seq_len": 32, "batch_size": 4, "max_tokens": 256},
                    }
                ],
                "methods": [
                    {"name": "full", "method": {"kind": "full"}, "lrs": [1e-3]},
                    {"name": "lora-r4", "method": {"kind": "lora", "rank": 4}, "lrs": [1e-2]},
                ],
                "evals": {"checkpoints": "final", "groups": [{"tasks": [task]}, {"tasks": ["kl_base:500"]}]},
                "report": {"learning": task, "forgetting": "kl_base:500"},
            }
        )
    )
    d = run_study(cfg, [], tmp_path / "study", executor="inline", progress=False)
    html = write_report(d).read_text()
    st = load_study_dir(d)
    rows = metric_rows(st)
    [h] = headlines(st, points(st, rows), rows)
    assert h.learning.task == task and h.learning.metric == "acc,none"
    assert h.verdicts and all(v.verdict for v in h.verdicts)
    assert task in html and '<div class="verdict">' in html
