"""Data: packing, IFT masking, decontamination, determinism, held-out split, user files, errors."""

import json
import sys

import numpy as np
import pytest

import lorascope.data as data
from lorascope.config import DataConfig
from lorascope.data import dataset_manifest, gsm8k_symbolic_ids, heldout_texts, load_dataset, load_docs
from lorascope.data.code_data import docstring_pairs
from lorascope.data.decontam import Decontaminator, decontaminate
from lorascope.data.pack import pack_examples, pack_stream, render_pair
from lorascope.errors import LorascopeError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # built datasets go to a per-test cache; the converted embedded tokenizer stays in the real one
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _code_rows(n=30):
    return [{"text": f"def f{i}(x):\n    '''Multiply by {i}.'''\n    return x * {i} + {i * i}\n" * 3} for i in range(n)]


def test_pack_stream_no_padding_reconstructs():
    toks = np.arange(103, dtype=np.int32)
    ds = pack_stream(toks, 10)
    assert len(ds) == 10
    flat = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    assert np.array_equal(flat, toks[:100])
    assert all(bool(ds[i]["attention_mask"].all()) for i in range(len(ds)))
    assert np.array_equal(ds[3]["labels"].numpy(), ds[3]["input_ids"].numpy())


def test_cpt_rows_start_with_bos_when_the_tokenizer_adds_one(tmp_path, tokenizer):
    import copy

    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "c.jsonl", _code_rows())))
    plain = load_dataset(dc, tokenizer, seq_len=32)  # this tokenizer adds no BOS: rows are bare stream slices
    assert plain[0]["input_ids"][0] != tokenizer.bos_token_id
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True  # a Gemma/Llama-style tokenizer: every text it encodes starts with BOS
    ds = load_dataset(dc, tok, seq_len=32)
    rows = [ds[i] for i in range(len(ds))]
    assert all(len(r["input_ids"]) == 32 and r["input_ids"][0] == tok.bos_token_id for r in rows)
    assert all(r["labels"].tolist() == r["input_ids"].tolist() for r in rows)
    # after the BOS, the rows are the same stream, cut 31 tokens at a time
    flat = np.concatenate([plain[i]["input_ids"].numpy() for i in range(len(plain))])
    body = np.concatenate([r["input_ids"][1:].numpy() for r in rows])
    n = min(len(flat), len(body))
    assert np.array_equal(flat[:n], body[:n]) and len(ds) >= len(plain)


def test_pack_examples_keeps_masks_and_boundaries():
    toks = np.arange(1, 16, dtype=np.int32)
    labels = toks.copy()
    labels[[0, 1, 5, 9, 10, 11]] = -100  # prompts; the 3rd example (9..11) has no response token -> skipped
    ds = pack_examples(toks, labels, np.array([5, 4, 3, 3]), seq_len=8, pad_id=0)
    assert len(ds) == 2  # [ex0] then [ex1, ex3]; ex2 only prompt
    r0, r1 = ds[0], ds[1]
    assert r0["input_ids"][:5].tolist() == [1, 2, 3, 4, 5] and r0["labels"][:2].tolist() == [-100, -100]
    assert r0["labels"][5:].tolist() == [-100] * 3 and r0["attention_mask"].tolist() == [1] * 5 + [0] * 3
    assert r1["input_ids"][:7].tolist() == [6, 7, 8, 9, 13, 14, 15]
    assert r1["labels"][:7].tolist() == [-100, 7, 8, 9, 13, 14, 15] and r1["attention_mask"].sum() == 7
    # an example longer than seq_len is truncated, not split
    ds = pack_examples(np.arange(1, 13, dtype=np.int32), np.arange(1, 13, dtype=np.int32), np.array([12]), 8, 0)
    assert len(ds) == 1 and ds[0]["input_ids"].tolist() == list(range(1, 9))


def test_ift_masks_exactly_the_prompt(tmp_path, tokenizer):
    rows = [{"prompt": f"Say {i} twice.", "response": f"{i} {i}"} for i in range(3)]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Say 7."},
                {"role": "assistant", "content": "7"},
            ]
        }
    )
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "ift.jsonl", rows)), regime="ift")
    ds = load_dataset(dc, tokenizer, seq_len=512)
    assert len(ds) == 1  # all four packed into one row
    x = ds[0]
    n = int(x["attention_mask"].sum())
    assert (x["labels"][n:] == -100).all() and (x["attention_mask"][:n] == 1).all()
    # the trained tokens are exactly the responses as the chat template renders them (end-of-turn included)
    docs = load_docs(dc)["train"]
    want = sum((tokenizer(render_pair(tokenizer, d)[1], add_special_tokens=False)["input_ids"] for d in docs), [])
    assert x["labels"][x["labels"] != -100].tolist() == want
    text = tokenizer.decode(x["input_ids"][x["labels"] != -100])
    assert text.count("<|im_end|>") == 4 and "Say" not in text and "terse" not in text
    full = tokenizer.decode(x["input_ids"][:n])
    assert "Be terse." in full and "Say 7." in full  # the chat turns are in the input, only masked


def test_ift_seq_len_shorter_than_every_prompt_is_named(tmp_path, tokenizer):
    rows = [{"prompt": f"Say {i} twice.", "response": f"{i} {i}"} for i in range(3)]
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "short.jsonl", rows)), regime="ift")
    with pytest.raises(LorascopeError, match=r"^train\.seq_len: 4 tokens leave no response token"):
        load_dataset(dc, tokenizer, seq_len=4)


def test_ift_plain_format_without_chat_template(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    rows = [{"prompt": "Add 2 and 3.", "response": "5"}, {"prompt": "Add 1 and 1.", "response": "2"}]
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "p.jsonl", rows)), regime="ift")
    x = load_dataset(dc, tok, seq_len=64)[0]
    want = sum((tok(r["response"] + tok.eos_token, add_special_tokens=False)["input_ids"] for r in rows), [])
    assert x["labels"][x["labels"] != -100].tolist() == want
    assert "### Instruction:\nAdd 2 and 3." in tok.decode(x["input_ids"])
    assert dataset_manifest(dc, tok)["ift_format"].startswith("plain")


def test_data_cli_reports_rows(tmp_path, tiny_model_dir):
    from lorascope.data.describe import data_cli

    rows = [{"prompt": f"Say {i}.", "response": f"{i}"} for i in range(12)]
    m = data_cli(str(_write_jsonl(tmp_path / "s.jsonl", rows)), model=str(tiny_model_dir), regime="ift", seq_len=128)
    assert m["documents"]["train"] + m["documents"]["heldout"] == 12 and m["rows"]["train"] >= 1
    assert 0 < m["rows"]["train_supervised"] < m["rows"]["train_fill"] <= 1
    from typer.testing import CliRunner

    from lorascope.cli import app

    r = CliRunner().invoke(
        app, ["data", str(tmp_path / "s.jsonl"), "--model", str(tiny_model_dir), "--regime", "ift", "--seq-len", "128"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"] == m["rows"]
    bad = CliRunner().invoke(app, ["data", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir)])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output


def test_cpt_user_files_determinism_and_heldout(tmp_path, tokenizer, monkeypatch):
    rows = _code_rows()
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "c.jsonl", rows)))
    a = dataset_manifest(dc, tokenizer)
    assert a["documents"]["train"] + a["documents"]["heldout"] == 30 and a["documents"]["heldout"] > 0
    assert a["excluded_eval_ids"] == {} and len(a["content_hash"]) == 64
    ds = load_dataset(dc, tokenizer, seq_len=32)
    assert len(ds) == a["tokens"]["train"] // 32
    # rebuilt from scratch in another cache: same documents, order and tokens
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache2")
    b = dataset_manifest(dc, tokenizer)
    assert b["content_hash"] == a["content_hash"] and b["tokens"] == a["tokens"]
    ds2 = load_dataset(dc, tokenizer, seq_len=32)
    assert all(ds[i]["input_ids"].tolist() == ds2[i]["input_ids"].tolist() for i in range(len(ds)))
    docs = load_docs(dc)
    held = set(heldout_texts(dc))
    assert held == set(docs["heldout"]) and not held & set(docs["train"])
    assert held | set(docs["train"]) == {r["text"] for r in rows}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    pm = dataset_manifest(DataConfig(dataset=str(tmp_path / "c.parquet")), tokenizer)
    assert pm["content_hash"] == a["content_hash"]  # same records -> same dataset, whatever the file format
    (tmp_path / "c.txt").write_text(rows[0]["text"] * 20)
    t = load_dataset(DataConfig(dataset=str(tmp_path / "c.txt")), tokenizer, 32)
    assert len(t) > 0 and heldout_texts(str(tmp_path / "c.txt")) == []  # one document: all training
    assert len(load_dataset(DataConfig(dataset=str(tmp_path / "c.jsonl"), max_docs=5), tokenizer, 8)) < len(
        load_dataset(dc, tokenizer, 8)
    )


def test_decontamination_drops_an_eval_solution():
    from lorascope.benchdata import humaneval

    item = humaneval()[0]
    deco = Decontaminator()
    clean = "import os\n\ndef unrelated(a, b):\n    return os.path.join(a, b)\n" * 3
    dirty = "# helpers\n" + item["prompt"] + item["canonical_solution"] + "\n\nprint('ok')\n"
    only_solution = "x = 1\n" + item["canonical_solution"]  # < 50% of the item's 10-grams
    keep, stats = decontaminate([clean, dirty, only_solution], deco)
    assert keep == [clean, only_solution] and stats["dropped"] == {"humaneval": 1}
    assert stats["items_hit"] == {"humaneval": 1}


def test_manifest_names_what_decontamination_dropped(tmp_path, tokenizer):
    from lorascope.benchdata import humaneval

    he = humaneval()
    dirty = [{"text": "# copied\n" + p["prompt"] + p["canonical_solution"]} for p in he[:2]]
    dc = DataConfig(dataset=str(_write_jsonl(tmp_path / "d.jsonl", _code_rows() + dirty)))
    m = dataset_manifest(dc, tokenizer)
    dec = m["decontamination"]  # the field names the data module's docstring documents
    dropped = {s: dec[s]["dropped"].get("humaneval", 0) for s in ("train", "heldout")}
    assert sum(dropped.values()) == 2 and m["documents"]["train"] + m["documents"]["heldout"] == 30
    assert sum(dec[s]["items_hit"].get("humaneval", 0) for s in ("train", "heldout")) == 2


def test_heldout_groups_stay_aligned_through_decontamination(tmp_path, tokenizer, monkeypatch):
    from lorascope.benchdata import humaneval

    p = humaneval()[0]
    held = ["held out a\n" * 50, "# copied\n" + p["prompt"] + p["canonical_solution"], "held out b\n" * 50]

    def builder():
        return [r["text"] for r in _code_rows()], held, [{"name": "fake", "licence": "MIT"}], ["pkg/a", "pkg/x", None]

    monkeypatch.setitem(data.BUILDERS, "code-cpt", builder)
    dc = DataConfig(dataset="code-cpt")
    docs = load_docs(dc)
    # the contaminated middle document is dropped together with its group, not shifting the others
    assert heldout_texts(dc) == [held[0], held[2]] and data.heldout_groups(dc) == ["pkg/a", None]
    assert docs["decontamination"]["heldout"]["dropped"] == {"humaneval": 1}


def test_decontamination_threshold_and_short_items():
    words = [f"w{i}" for i in range(30)]  # 21 distinct 10-grams
    deco = Decontaminator({"toy": [(0, " ".join(words)), (1, "tiny item of five")]})
    assert deco.hit("pre " + " ".join(words[:20]) + " post") == ("toy", 0)  # 11 of 21 grams
    assert deco.hit(" ".join(words[:19])) is None  # 10 of 21
    assert deco.hit("a tiny item of five words") == ("toy", 1) and deco.hit("tiny item of six") is None


def test_docstring_pairs_humaneval_format():
    src = (
        'import math\nimport os\n\n\ndef hyp(a, b):\n    """Return the hypotenuse of a right triangle with legs '
        'a and b.\n    >>> hyp(3, 4)\n    5.0\n    """\n    s = a * a + b * b\n    return math.sqrt(s)\n\n\n'
        'def _private(x):\n    """A private helper that should not become a training pair at all."""\n'
        "    y = x\n    return y\n"
    )
    (p,) = docstring_pairs(src)
    assert p["prompt"].startswith("import math\n\n\ndef hyp(a, b):") and p["prompt"].endswith('    """\n')
    assert "import os" not in p["prompt"]
    assert p["response"] == "```python\n" + p["prompt"] + "    s = a * a + b * b\n    return math.sqrt(s)\n```"


def test_gsm8k_ids_and_symbolic_generator():
    from lorascope.data.gsm_symbolic import generate

    ids = gsm8k_symbolic_ids()
    assert len(ids) == 100 == len(set(ids)) and 20 in ids and all(0 <= i < 1319 for i in ids)
    a, b = generate(12, seed=3), generate(12, seed=3)
    assert a == b and len({x["question"] for x in a}) > 6
    assert all(x["answer_cot"].splitlines()[-1] == f"#### {x['answer']}" for x in a)


@pytest.mark.parametrize(
    "name,content,kw,msg",
    [
        ("d.jsonl", None, {}, "does not exist"),
        ("d.jsonl", "", {}, "is empty"),
        ("d.jsonl", '{"body": "x"}', {}, r"record 1 has no field 'text' \(set data.text_field\)"),
        ("d.jsonl", '{"text": 1', {}, "line 1 is not valid JSON"),
        ("d.csv", "text\nx", {}, r"must end in \.jsonl, \.parquet or \.txt"),
        ("d.jsonl", '{"prompt": "q"}', {"regime": "ift"}, "no field 'response' .*data.response_field"),
        ("d.jsonl", '{"messages": [{"role": "user", "content": "q"}]}', {"regime": "ift"}, "ending with an assistant"),
    ],
)
def test_errors_name_file_and_field(tmp_path, tokenizer, name, content, kw, msg):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(LorascopeError, match=msg) as e:
        load_dataset(DataConfig(dataset=str(p), **kw), tokenizer, 16)
    assert name in str(e.value)


def test_hub_dataset_needs_datasets_package(tokenizer, monkeypatch):
    # whether or not datasets is installed here: a None entry in sys.modules makes `import datasets` fail
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(LorascopeError, match=r"'hf:org/set' needs the datasets package \(pip install datasets\)"):
        load_dataset(DataConfig(dataset="hf:org/set", regime="ift"), tokenizer, 16)


def test_builtin_regime_and_split_errors(tokenizer):
    with pytest.raises(LorascopeError, match="data.regime: 'code-cpt' is a cpt dataset"):
        load_dataset(DataConfig(dataset="code-cpt", regime="ift"), tokenizer, 16)
    with pytest.raises(LorascopeError, match="split must be"):
        load_dataset(DataConfig(dataset="code-cpt"), tokenizer, 16, split="test")


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_builtins_build(tokenizer, monkeypatch):
    from lorascope.assets import cache_dir
    from lorascope.benchdata import math500
    from lorascope.data.decontam import doc_text

    monkeypatch.setattr(data, "cache_dir", cache_dir)  # the real cache: later runs reuse these builds
    for name in data.BUILTIN:
        dc = DataConfig(dataset=name)
        m = dataset_manifest(dc, tokenizer)
        print(name, m["documents"], m["tokens"], m["decontamination"])
        assert m["documents"]["train"] > 1000 and m["documents"]["heldout"] > 50, (name, m["documents"])
        assert m["tokens"]["train"] > 500_000 and m["tokens"]["heldout"] > 20_000, (name, m["tokens"])
        assert m["sources"] and all("licence" in s or "from" in s for s in m["sources"])
        assert set(m["decontamination"]) == {"rule", "train", "heldout"}
        assert json.loads(json.dumps(m)) == m
        docs = load_docs(dc)
        train = {doc_text(d) for d in docs["train"]}
        held = heldout_texts(name)
        assert len(held) == m["documents"]["heldout"] and not set(held) & train
        ds = load_dataset(dc, tokenizer, 512)
        assert len(ds) > 100 and ds[0]["input_ids"].shape == (512,)
        if name == "math-ift":
            assert m["excluded_eval_ids"] == {"gsm8k": gsm8k_symbolic_ids()}
            probs = {" ".join(d["prompt"].split()) for d in docs["train"] + docs["heldout"]}
            assert not probs & {" ".join(x["problem"].split()) for x in math500()}
        else:
            assert m["excluded_eval_ids"] == {}


def test_parallel_builders_build_once(tmp_path, tokenizer, monkeypatch):
    """Two processes asking for the same uncached dataset: one builds, the other waits and reads the cache."""
    import multiprocessing as mp

    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path / "cache"))
    src = _write_jsonl(tmp_path / "c.jsonl", _code_rows())
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_and_report, args=(str(src), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    built = sorted(q.get(timeout=5) for _ in procs)
    assert built == [False, True]  # exactly one process ran the builder


def _build_and_report(src, q):
    built = []
    real = data._build_docs
    data._build_docs = lambda *a: built.append(1) or real(*a)
    data.load_docs(DataConfig(dataset=src))
    q.put(bool(built))
