"""`lorascope export`: adapters and merged models that plain transformers / PEFT load with the logits lorascope
gets from the checkpoint, a model card, and no machine-local path in any exported file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_code_corpus
from typer.testing import CliRunner

from lorascope.cli import app
from lorascope.config import RunConfig
from lorascope.models import find_checkpoint, load_checkpoint, portable_base
from lorascope.train.loop import train

TPS = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("export-run")
    corpus = write_code_corpus(root, n=40, repeat=4)
    cfg = RunConfig(
        model=str(tiny_model_dir),
        data={"dataset": str(corpus)},
        method={"kind": "lora", "rank": 4, "dropout": 0.0},
        train={"seq_len": 16, "batch_size": 4, "max_tokens": 4 * TPS, "checkpoints": [2 * TPS], "lr": 1e-2},
    )
    return train(cfg, root / "run", progress=False)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


def _export(*args: str) -> None:
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 0, result.output


def _assert_no_local_paths(d: Path, *roots: Path) -> None:
    from lorascope.assets import cache_dir

    needles = [str(r) for r in (*roots, cache_dir(), Path.home())]
    for f in d.rglob("*"):
        if f.is_file():
            text = f.read_bytes().decode("utf-8", "ignore")
            assert not [n for n in needles if n in text], f"{f.name} names a local path"


def test_adapter_and_merged_reload_with_plain_libraries(tmp_path, lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = find_checkpoint(lora_run, "tok-000000000128")
    ours, tok = load_checkpoint(ck)  # lorascope's own load: the base + the unmerged adapter
    want = _logits(ours, tok)
    _export(f"{lora_run}:tok-000000000128", "--out", str(tmp_path / "adapter"))
    _export(f"{lora_run}:tok-000000000128", "--out", str(tmp_path / "merged"), "--merged")

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    plain_tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert (want - _logits(adapter, plain_tok)).abs().max() <= 1e-5
    assert (want - _logits(merged, plain_tok)).abs().max() <= 1e-5
    untuned = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert (want - _logits(untuned, tok)).abs().max() > 1e-4  # the adapter matters: dropping it would show

    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == tiny_model_dir.name
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"local model directory `{tiny_model_dir.name}`" in card and "## Training config" in card
    assert "## Training data" in card and "content_hash" in card and "rank: 4" in card and "step 2" in card
    for d in ("adapter", "merged"):
        _assert_no_local_paths(tmp_path / d, tmp_path.parent, lora_run.parent, tiny_model_dir)


def test_export_refuses_bad_input(tmp_path, lora_run):
    result = CliRunner().invoke(app, ["export", f"{lora_run}:tok-999", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "checkpoint 'tok-999' does not exist" in result.output
    (tmp_path / "taken").mkdir()
    result = CliRunner().invoke(app, ["export", str(lora_run), "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not (tmp_path / "x").exists()


def test_study_run_card_has_the_conclusions(tmp_path, tiny_study_dir):
    """A full fine-tuning run of a reported study: the exported model is the checkpoint, the card carries the
    study's verdicts and recommendation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorascope.report import write_report
    from lorascope.train.tracking import study_conclusions

    study = shutil.copytree(tiny_study_dir, tmp_path / "study")
    write_report(study)
    full = next(r for r in json.loads((study / "runs.json").read_text()) if r["method"]["kind"] == "full")
    run = study / "runs" / full["run_id"]
    _export(str(run), "--out", str(tmp_path / "out"))
    ours, tok = load_checkpoint(find_checkpoint(run))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert (_logits(ours, tok) - _logits(plain, AutoTokenizer.from_pretrained(str(tmp_path / "out")))).abs().max() == 0
    card = (tmp_path / "out" / "README.md").read_text()
    found = study_conclusions(study)
    assert any(k.startswith("verdict/") for k in found)
    for k, v in found.items():
        if k.startswith(("verdict/", "recommendation/")):
            assert f"- {k}: {v}" in card
    _assert_no_local_paths(tmp_path / "out", tmp_path, tiny_study_dir)


def test_gguf_base_named_by_file_and_hash(tmp_path, tiny_model):
    """A GGUF base: the adapter records the file's name (not the cache directory it was converted into), and the
    card names it with its sha256."""
    from lorascope.assets import embedded_gguf
    from lorascope.config import MethodConfig
    from lorascope.export import base_line
    from lorascope.train import methods

    assert portable_base("embedded") == embedded_gguf().name
    assert portable_base("/models/x/smol.Q8_0.gguf") == "smol.Q8_0.gguf"
    assert portable_base("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    m = MethodConfig(kind="lora", rank=2)
    model = methods.apply_method(tiny_model, m)
    methods.save_checkpoint(model, m, tmp_path / "ck", "/models/x/smol.Q8_0.gguf", {"step": 1})
    cfg = json.loads((tmp_path / "ck" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smol.Q8_0.gguf"
    assert json.loads((tmp_path / "ck" / "lorascope.json").read_text())["base"] == "/models/x/smol.Q8_0.gguf"
    digest = hashlib.sha256(embedded_gguf().read_bytes()).hexdigest()
    assert base_line("embedded") == f"GGUF file `{embedded_gguf().name}`, sha256 `{digest}`"


def test_a_file_naming_a_local_path_is_refused(tmp_path):
    from lorascope.errors import LorascopeError
    from lorascope.export import _check_portable, portable

    (tmp_path / "ok.json").write_text(json.dumps(portable({"model": str(tmp_path / "m"), "lr": 1e-3, "x": "a/b"})))
    _check_portable(tmp_path, [tmp_path / "m"])
    assert json.loads((tmp_path / "ok.json").read_text())["model"] == "m"
    (tmp_path / "bad.json").write_text(json.dumps({"model": str(tmp_path / "m")}))
    with pytest.raises(LorascopeError, match="bad.json: names a machine-local path"):
        _check_portable(tmp_path, [tmp_path / "m"])
