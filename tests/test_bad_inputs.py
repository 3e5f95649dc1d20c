"""Bad inputs, up front: each one ends in exactly one line ``error: ...`` on stderr, a non-zero exit, and nothing
half-written that looks complete (no COMPLETE, results.json or report.html under the output path).

Every case runs the real CLI in-process (typer's CliRunner); none loads a model's weights or trains a step, so
the whole list takes seconds. Add a case here when a new bad input is found.
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from lorascope.cli import app

DONE_MARKERS = ("COMPLETE", "results.json", "report.html")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Files the cases point at: a run config on the tiny model, a corpus, broken files, a fake run directory."""
    d = tmp_path_factory.mktemp("bad-inputs")
    corpus = d / "code.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}():\n    return {i}\n" * 4}) + "\n" for i in range(40)))
    run_cfg = {
        "model": str(tiny_model_dir),
        "method": {"kind": "lora", "rank": 2},
        "data": {"dataset": str(corpus)},
        "train": {"seq_len": 32, "batch_size": 2, "max_tokens": 256},
    }
    (d / "run.yaml").write_text(yaml.safe_dump(run_cfg))
    (d / "notyaml.yaml").write_text("model: [unclosed\n  : :\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text('{"text": "ok"}\nnot json at all\n')
    (d / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (d / "data.csv").write_text("text\nhello\n")
    (d / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    (d / "noconfig").mkdir()
    ck = d / "run" / "checkpoints" / "tok-000000000256"
    ck.mkdir(parents=True)
    (ck / "lorascope.json").write_text(json.dumps({"kind": "lora", "base": str(tiny_model_dir), "tokens": 256}))
    (d / "emptyrun" / "checkpoints").mkdir(parents=True)
    badmeta = d / "badmeta" / "checkpoints" / "tok-000000000001"
    badmeta.mkdir(parents=True)
    (badmeta / "lorascope.json").write_text("{not json")
    (d / "notastudy").mkdir()
    return d


# (case id, argv with {d} for the world directory and {out} for a fresh output path, what the line must name)
CASES = [
    # --- train: config files and fields
    ("train-missing-config", ["train", "{d}/nope.yaml", "--out", "{out}"], "nope.yaml"),
    ("train-config-not-yaml", ["train", "{d}/notyaml.yaml", "--out", "{out}"], "notyaml.yaml"),
    ("train-config-a-list", ["train", "{d}/list.yaml", "--out", "{out}"], "list.yaml"),
    ("train-unknown-field", ["train", "{d}/run.yaml", "train.speed=3", "--out", "{out}"], "train.speed"),
    ("train-lr-not-a-number", ["train", "{d}/run.yaml", "train.lr=fast", "--out", "{out}"], "train.lr"),
    ("train-lr-negative", ["train", "{d}/run.yaml", "train.lr=-1e-4", "--out", "{out}"], "train.lr"),
    ("train-seq-len-tiny", ["train", "{d}/run.yaml", "train.seq_len=4", "--out", "{out}"], "train.seq_len"),
    ("train-seq-len-past-context", ["train", "{d}/run.yaml", "train.seq_len=1000000", "--out", "{out}"], "1024 tokens"),
    ("train-seq-len-past-context-dry", ["train", "{d}/run.yaml", "train.seq_len=5000", "--dry-run"], "1024 tokens"),
    ("train-memory-over", ["train", "{d}/run.yaml", "train.batch_size=100000000", "--out", "{out}"], "--ignore-memory"),
    ("train-no-out", ["train", "{d}/run.yaml"], "--out"),
    ("train-unknown-method", ["train", "{d}/run.yaml", "method.kind=qlora", "--out", "{out}"], "method.kind"),
    ("train-rank-zero", ["train", "{d}/run.yaml", "method.rank=0", "--out", "{out}"], "method.rank"),
    (
        "train-unknown-targets",
        ["train", "{d}/run.yaml", "method.targets=everything", "--out", "{out}"],
        "method.targets",
    ),
    (
        "train-checkpoints-order",
        ["train", "{d}/run.yaml", "train.checkpoints=[128,64]", "--out", "{out}"],
        "checkpoints",
    ),
    ("train-no-budget", ["train", "{d}/run.yaml", "train.max_tokens=null", "--out", "{out}"], "max_tokens"),
    ("train-model-missing-path", ["train", "{d}/run.yaml", "model=./no/such/model", "--out", "{out}"], "no/such/model"),
    ("train-model-no-config", ["train", "{d}/run.yaml", "model={d}/noconfig", "--out", "{out}"], "config.json"),
    ("train-model-fake-gguf", ["train", "{d}/run.yaml", "model={d}/fake.gguf", "--out", "{out}"], "GGUF"),
    ("train-model-bad-hub-id", ["train", "{d}/run.yaml", "model=not a model!", "--out", "{out}"], "not a model!"),
    ("train-data-missing", ["train", "{d}/run.yaml", "data.dataset={d}/nope.jsonl", "--out", "{out}"], "nope.jsonl"),
    # --- eval: model specs, tasks, settings
    ("eval-not-a-run-checkpoint", ["eval", "notamodel:tok-999", "--tasks", "kl_base", "--out", "{out}"], "notamodel"),
    ("eval-run-unknown-checkpoint", ["eval", "{d}/run:tok-999", "--tasks", "arc_easy", "--out", "{out}"], "tok-999"),
    ("eval-run-no-checkpoints", ["eval", "{d}/emptyrun", "--tasks", "arc_easy", "--out", "{out}"], "emptyrun"),
    ("eval-run-bad-metadata", ["eval", "{d}/badmeta", "--tasks", "arc_easy", "--out", "{out}"], "lorascope.json"),
    (
        "eval-run-checkpoint-no-weights",
        ["eval", "{d}/run", "--tasks", "arc_easy", "--out", "{out}"],
        "tok-000000000256",
    ),
    ("eval-unknown-task", ["eval", "{d}/run", "--tasks", "hellaswagg", "--out", "{out}"], "hellaswagg"),
    ("eval-duplicate-tasks", ["eval", "{d}/run", "--tasks", "arc_easy,arc_easy", "--out", "{out}"], "duplicates"),
    ("eval-no-tasks", ["eval", "{d}/run", "--tasks", ",", "--out", "{out}"], "no tasks"),
    ("eval-limit-zero", ["eval", "{d}/run", "--tasks", "arc_easy", "--limit", "0", "--out", "{out}"], "limit"),
    ("eval-shots-negative", ["eval", "{d}/run", "--tasks", "arc_easy", "--shots", "-1", "--out", "{out}"], "shots"),
    ("eval-batch-zero", ["eval", "{d}/run", "--tasks", "arc_easy", "--batch-size", "0", "--out", "{out}"], "batch"),
    ("eval-code-without-opt-in", ["eval", "{d}/run", "--tasks", "humaneval", "--out", "{out}"], "allow-code-execution"),
    ("eval-parametric-no-arg", ["eval", "{d}/run", "--tasks", "heldout_bpb", "--out", "{out}"], "heldout_bpb"),
    ("eval-arg-not-taken", ["eval", "{d}/run", "--tasks", "arc_easy:5", "--out", "{out}"], "arc_easy"),
    ("eval-lm-eval-bad-role", ["eval", "{d}/run", "--tasks", "lm_eval:arc_easy@sideways", "--out", "{out}"], "role"),
    # --- data
    ("data-missing-file", ["data", "{d}/nope.jsonl", "--model", "{model}"], "nope.jsonl"),
    ("data-unknown-builtin", ["data", "code-cpt-xl", "--model", "{model}"], "code-cpt-xl"),
    ("data-unsupported-format", ["data", "{d}/data.csv", "--model", "{model}"], "data.csv"),
    ("data-empty-file", ["data", "{d}/empty.jsonl", "--model", "{model}"], "empty.jsonl"),
    ("data-broken-jsonl", ["data", "{d}/bad.jsonl", "--model", "{model}"], "bad.jsonl"),
    ("data-no-text-field", ["data", "{d}/notext.jsonl", "--model", "{model}"], "text"),
    ("data-bad-regime", ["data", "{d}/code.jsonl", "--model", "{model}", "--regime", "sft"], "regime"),
    # --- study, report, analysis
    ("study-missing-file", ["study", "{d}/nope.yaml", "--out", "{out}"], "nope.yaml"),
    ("study-address-without-ray", ["study", "{d}/run.yaml", "--out", "{out}", "--address", "h:1"], "--address"),
    ("report-not-a-study", ["report", "{d}/notastudy"], "notastudy"),
    ("spectrum-not-a-run", ["spectrum", "{d}/notastudy", "--out", "{out}"], "notastudy"),
]


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(world, tiny_model_dir, tmp_path, argv, names):
    out = tmp_path / "out"
    args = [a.format(d=world, out=out, model=tiny_model_dir) for a in argv]
    r = CliRunner().invoke(app, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code != 0, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr or repr(r.exception)
    assert names in lines[0]
    done = [p for m in DONE_MARKERS for p in (out.rglob(m) if out.exists() else [])]
    assert not done, done


def test_refusals_before_anything_is_written(world, tmp_path):
    """The two inputs that used to hurt: a sequence past the model's context and a run too big for memory are
    refused before a run directory exists."""
    for override in ("train.seq_len=1000000", "train.batch_size=100000000"):
        out = tmp_path / override.split("=")[0]
        r = CliRunner().invoke(app, ["train", str(world / "run.yaml"), override, "--out", str(out)])
        assert r.exit_code == 2 and not out.exists(), r.stderr


def test_at_least_thirty_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


def test_memory_estimate_follows_the_run_shape(world):
    from lorascope.config import load_run_config
    from lorascope.train.estimate import memory_estimate

    def est(*overrides):
        return memory_estimate(load_run_config(world / "run.yaml", list(overrides)))["parts"]

    lora, full = est(), est("method.kind=full")
    assert full["gradients_and_optimizer"] > 10 * lora["gradients_and_optimizer"]  # all parameters vs adapters
    assert full["activations"] == lora["activations"]
    assert est("train.batch_size=4")["activations"] == 2 * lora["activations"]
    assert est("train.seq_len=64")["activations"] > 2 * lora["activations"]  # attention rows grow with seq_len too


def test_memory_refusal_and_its_override(world, tmp_path, monkeypatch, one_thread):
    """A run that fits nowhere near the memory is refused, the dry run says so without measuring steps, and
    --ignore-memory-estimate trains it anyway."""
    from lorascope.train import estimate

    monkeypatch.setattr(estimate, "available_memory", lambda: {"available_bytes": 2**20, "available_where": "test"})
    cfg = str(world / "run.yaml")
    r = CliRunner().invoke(app, ["train", cfg, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--ignore-memory-estimate" in r.stderr and not (tmp_path / "a").exists()
    r = CliRunner().invoke(app, ["train", cfg, "--dry-run"])
    assert (
        r.exit_code == 0
        and "would be refused" in r.stdout
        and "measured" not in r.stdout.replace("no step was measured", "")
    )
    r = CliRunner().invoke(app, ["train", cfg, "--out", str(tmp_path / "b"), "--ignore-memory-estimate"])
    assert r.exit_code == 0 and (tmp_path / "b" / "COMPLETE").exists(), r.output
