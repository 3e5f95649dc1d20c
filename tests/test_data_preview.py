"""``lorascope data FILE --preview``: what a study would train and evaluate on, from the data's own build."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorascope.cli import app
from lorascope.config import DataConfig
from lorascope.data import load_docs
from lorascope.data.describe import preview
from lorascope.splits import split_of


def _corpus(tmp_path, n=60):
    p = tmp_path / "notes.jsonl"
    rows = [{"text": f"Note {i}: " + " ".join(f"line {j} of note {i}." for j in range(40 + i))} for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_preview_counts_match_the_build_and_the_splits(tmp_path, tiny_model_dir):
    p = _corpus(tmp_path)
    pv = preview(str(p), model=str(tiny_model_dir))
    docs = load_docs(DataConfig(dataset=str(p)))
    assert pv["documents"] == {"train": len(docs["train"]), "heldout": len(docs["heldout"])}
    assert pv["documents"]["train"] + pv["documents"]["heldout"] == 60 and pv["documents"]["heldout"] > 0
    assert "one record at a time" in pv["heldout_unit"] and pv["heldout_groups"]["count"] == 0
    ev = pv["evaluation"]
    assert ev["validation"]["windows"] + ev["test"]["windows"] == ev["windows"] > 0
    # one record, one cluster: clusters per split are the held-out records whose key hashes to that split
    assert ev["validation"]["clusters"] + ev["test"]["clusters"] == pv["documents"]["heldout"]
    limited = preview(str(p), model=str(tiny_model_dir), eval_limit=3)["evaluation"]
    assert limited["windows"] == 3 and limited["validation"]["windows"] + limited["test"]["windows"] == 3


def test_preview_split_of_each_cluster_is_the_evaluations(tmp_path, tiny_model_dir):
    from lorascope.evals.texts import heldout_windows

    p = _corpus(tmp_path)
    ev = preview(str(p), model=str(tiny_model_dir))["evaluation"]
    wins = heldout_windows(str(p))
    test = {w["cluster"] for w in wins if split_of(w["cluster"]) == "test"}
    assert ev["test"]["clusters"] == len(test)


def test_cli_preview_prints_what_a_study_evaluates(tmp_path, tiny_model_dir):
    p = _corpus(tmp_path)
    r = CliRunner().invoke(app, ["data", str(p), "--model", str(tiny_model_dir), "--preview"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    for want in ("documents     train", "held out by   one record", "decontam.", "[heldout]", f"heldout_bpb:{p}"):
        assert want in out, want
    assert out.count("windows in") == 2  # validation and test
    r = CliRunner().invoke(app, ["data", str(p), "--model", str(tiny_model_dir), "--preview", "--eval-limit", "0"])
    assert r.exit_code == 2 and r.stderr.startswith("error: --eval-limit")


def test_preview_reads_the_data_with_its_own_fields(tmp_path, tiny_model_dir):
    """A record field other than 'text': the preview (and the windows it counts) read it as a study would."""
    p = tmp_path / "body.jsonl"
    p.write_text("".join(json.dumps({"body": f"Entry {i}. " + "words here. " * (30 + i)}) + "\n" for i in range(40)))
    r = CliRunner().invoke(app, ["data", str(p), "--model", str(tiny_model_dir), "--preview"])
    assert r.exit_code == 2 and "text" in r.stderr  # the default field is not in these records
    r = CliRunner().invoke(app, ["data", str(p), "--model", str(tiny_model_dir), "--preview", "--text-field", "body"])
    assert r.exit_code == 0, r.output
    pv = preview(str(p), model=str(tiny_model_dir), fields={"text_field": "body"})
    assert pv["documents"]["train"] + pv["documents"]["heldout"] == 40 and pv["evaluation"]["windows"] > 0


@pytest.mark.skipif("group_field" not in DataConfig.model_fields, reason="DataConfig has no group_field here")
def test_preview_shows_groups_of_group_field(tmp_path, tiny_model_dir):
    p = tmp_path / "grouped.jsonl"
    rows = [{"text": f"Doc {i} of repo {i % 12}. " + "code line. " * 40, "repo": f"r{i % 12}"} for i in range(96)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pv = preview(str(p), model=str(tiny_model_dir), fields={"group_field": "repo"})
    assert "repo" in pv["heldout_unit"] and pv["heldout_groups"]["count"] >= 1
    ev = pv["evaluation"]
    assert ev["validation"]["clusters"] + ev["test"]["clusters"] == pv["heldout_groups"]["count"]
