"""Data: packing, IFT masking, decontamination, determinism, user files, errors."""

import json

import numpy as np
import pytest

from lorascope.config import DataConfig
from lorascope.data import dataset_manifest, heldout_texts, load_dataset, pack_examples, pack_stream
from lorascope.data.decontam import Decontaminator, decontaminate
from lorascope.errors import LorascopeError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path / "cache"))
    # the converted embedded tokenizer lives in the real cache; tests here only need built files isolated
    import lorascope.data as d

    monkeypatch.setattr(d, "cache_dir", lambda: tmp_path / "cache")


def test_pack_stream_no_padding_reconstructs():
    toks = np.arange(103, dtype=np.int32)
    ds = pack_stream(toks, 10)
    assert len(ds) == 10
    flat = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    assert np.array_equal(flat, toks[:100])
    assert all(ds[i]["attention_mask"].all() for i in range(len(ds)))
    assert np.array_equal(ds[3]["labels"].numpy(), ds[3]["input_ids"].numpy())


def test_pack_examples_keeps_masks():
    toks = np.arange(1, 13, dtype=np.int32)
    labels = toks.copy()
    labels[[0, 1, 5]] = -100  # prompts
    ds = pack_examples(toks, labels, np.array([5, 4, 3]), seq_len=8, pad_id=0)
    assert len(ds) == 2  # [5] then [4,3]
    r0 = ds[0]
    assert r0["input_ids"][:5].tolist() == [1, 2, 3, 4, 5] and r0["labels"][:2].tolist() == [-100, -100]
    assert r0["labels"][5:].tolist() == [-100] * 3 and r0["attention_mask"].tolist() == [1] * 5 + [0] * 3


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_ift_masks_exactly_the_prompt(tmp_path, tokenizer):
    rows = [{"prompt": f"Say {i} twice.", "response": f"{i} {i}"} for i in range(3)]
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "ift.jsonl", rows)), regime="ift")
    ds = load_dataset(dc, tokenizer, seq_len=256)
    x = ds[0]
    trained = x["input_ids"][x["labels"] != -100]
    text = tokenizer.decode(trained)
    assert text.count("<|im_end|>") == 3  # one end-of-turn per response, nothing of the prompts
    assert "Say" not in text and "0 0" in text and "2 2" in text


def test_cpt_user_files_and_determinism(tmp_path, tokenizer):
    rows = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 5} for i in range(30)]
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "c.jsonl", rows)))
    a = dataset_manifest(dc, tokenizer)
    assert a["documents"]["train"] + a["documents"]["heldout"] == 30
    assert dataset_manifest(dc, tokenizer)["content_hash"] == a["content_hash"]
    ds = load_dataset(dc, tokenizer, seq_len=32)
    assert len(ds) == a["tokens"]["train"] // 32
    held = set(heldout_texts(dc))
    assert held and not held & {r["text"] for r in rows if r["text"] not in held} and len(held) < 30
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert len(load_dataset(DataConfig(dataset=str(tmp_path / "c.parquet")), tokenizer, 32)) > 0
    (tmp_path / "c.txt").write_text(rows[0]["text"] * 20)
    assert len(load_dataset(DataConfig(dataset=str(tmp_path / "c.txt")), tokenizer, 32)) > 0


def test_decontamination_drops_an_eval_solution():
    from lorascope.evals.sources import humaneval

    item = humaneval()[0]
    deco = Decontaminator()
    clean = "import os\n\ndef unrelated(a, b):\n    return os.path.join(a, b)\n" * 3
    dirty = "# helpers\n" + item["prompt"] + item["canonical_solution"] + "\n\nprint('ok')\n"
    keep, dropped = decontaminate([clean, dirty], deco)
    assert keep == [clean] and dropped == {"humaneval": 1}


@pytest.mark.parametrize("content,field,msg", [
    (None, "text", "does not exist"),
    ("", "text", "is empty"),
    ('{"body": "x"}', "text", "has no field 'text'"),
    ('{"text": 1', "text", "not valid JSON"),
])
def test_errors_name_file_and_field(tmp_path, tokenizer, content, field, msg):
    p = tmp_path / "d.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(LorascopeError, match=msg):
        load_dataset(DataConfig(dataset=str(p), text_field=field), tokenizer, 16)


@pytest.mark.integration
def test_builtins_build(tokenizer):
    for name in ("code-cpt", "math-cpt", "code-ift", "math-ift"):
        m = dataset_manifest(DataConfig(dataset=name), tokenizer)
        assert m["documents"]["train"] > 500 and m["documents"]["heldout"] > 50, name
        assert m["tokens"]["train"] > 500_000, name
