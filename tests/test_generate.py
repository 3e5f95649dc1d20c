"""Generation's shortcuts give the outputs of the plain method (relational tests on the tiny random Llama):
continuous batching, token-sized batches and the static cache give one-at-a-time greedy outputs, and the
stop-string table decodes fewer rows while stopping at exactly the step a full decode of every row would."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from lorascope.evals import continuous
from lorascope.evals import generate as gen
from lorascope.evals.generate import StopOnText, generate

PROMPTS = [
    "def add(a, b):\n",
    "Question: What is 2 + 2?\nAnswer:",
    "Hi",
    "x",
    "A considerably longer prompt, so that the batch needs left padding for the short ones " * 3,
    "Question: name a colour.\nAnswer:",
    "import os\n",
    "The end",
]


def test_batches_sized_by_tokens():
    lengths = [60, 50, 20, 10, 10, 5, 5, 5, 5, 5]
    batches = gen._batches(lengths, batch_size=2, max_new_tokens=10)
    assert [k for b in batches for k in b] == list(range(len(lengths)))  # every row once, in order
    budget = 2 * (60 + 10)
    assert all(len(b) * (lengths[b[0]] + 10) <= budget for b in batches)
    assert max(len(b) for b in batches) > 2  # short prompts run more rows than the longest ones
    assert all(len(b) <= 8 for b in batches)  # and at most 4 x batch_size
    assert gen._batches(lengths, 1, 10) == [[k] for k in range(len(lengths))]  # one at a time
    assert gen._batches([], 4, 10) == []


def test_token_sized_batches_greedy_equal_one_at_a_time(tiny_model, tokenizer):
    one = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=1, progress=False)
    for bs in (2, 3):
        assert generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=bs, progress=False) == one


def test_static_cache_same_outputs_as_dynamic(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setattr(continuous, "supports", lambda model: False)  # model.generate's path
    static = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    assert gen._gen_config(tiny_model, tokenizer, 10, 0.0, 1.0, 0, ()).cache_implementation == "static"
    plain_config = gen._gen_config

    def dynamic(*a, **k):
        cfg = plain_config(*a, **k)
        cfg.cache_implementation = None
        return cfg

    monkeypatch.setattr(gen, "_gen_config", dynamic)
    assert generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, progress=False) == static


def _first_stop_step(tokenizer, ids: list[int], stop: list[str]) -> int | None:
    """Brute force: the first step whose full decode of the new tokens holds a stop string."""
    for k in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stop):
            return k
    return None


def test_stop_table_stops_where_a_full_decode_does(tokenizer):
    stop = ["\n\nQuestion:", "```", "\nclass", "é!"]
    pieces = [
        tokenizer.encode(t, add_special_tokens=False)
        for t in ["\n\n", "Question", ":", "``", "`", "\n", "class", "é", "!", " the", "ab", "\u00e9t\u00e9", " x"]
    ]
    rng = random.Random(0)
    rows = [[t for _ in range(24) for t in rng.choice(pieces)][:24] for _ in range(40)]
    prompt = tokenizer.encode("Prompt text", add_special_tokens=False)
    batch = torch.tensor([prompt + r for r in rows])
    crit = StopOnText(tokenizer, stop, len(prompt))
    stopped_at: dict[int, int] = {}
    for k in range(1, batch.shape[1] - len(prompt) + 1):
        done = crit(batch[:, : len(prompt) + k], None)
        for r in done.nonzero().flatten().tolist():
            stopped_at.setdefault(r, k)
    expected = {r: s for r, s in ((r, _first_stop_step(tokenizer, row, stop)) for r, row in enumerate(rows)) if s}
    assert stopped_at == expected and len(expected) > 10
    # the table spared decodes: fewer than one per unstopped row and step
    assert crit.decoded_rows < sum(expected.get(r, 24) for r in range(len(rows)))


@pytest.mark.parametrize("path", ["continuous", "generate"])
def test_stop_strings_cut_outputs_as_with_a_full_decode(tiny_model, tokenizer, monkeypatch, path):
    if path == "generate":
        monkeypatch.setattr(continuous, "supports", lambda model: False)
    free = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    stop = [free[0][0][3:6] or "e", "e", "\n"]
    fast = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, stop=stop, progress=False)
    monkeypatch.setattr(gen, "_may_end_stop", lambda tok, s: torch.ones(len(tok), dtype=torch.bool))
    full = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, stop=stop, progress=False)
    assert fast == full
    assert all(not any(s in o[0] for s in stop) for o in fast)


@pytest.fixture(scope="module")
def sharp_model(tokenizer):
    """The tiny Llama with large query/key weights: attention is peaked, so a wrong position, mask or cache
    column changes the tokens (at the default init, attention is nearly uniform and hides such errors)."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tokenizer), seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    return model


def test_continuous_batching_refills_slots_mid_decode_and_equals_one_at_a_time(sharp_model, tokenizer, monkeypatch):
    tiny_model = sharp_model
    free = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1, progress=False)
    stop = ["e", free[0][0][2:4] or "a"]  # rows stop at different steps
    one = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1, stop=stop, progress=False)
    joins = []
    add = continuous._Batch.add

    def spy(self, cache, length):
        joins.append((self.cache is not None, self.mask.shape[1], length))
        add(self, cache, length)

    monkeypatch.setattr(continuous._Batch, "add", spy)
    assert continuous.supports(tiny_model)
    for slots in (2, 3):
        assert (
            generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=slots, stop=stop, progress=False)
            == one
        )
    assert any(busy and width > length for busy, width, length in joins)  # joined rows already decoding
    # prompts in input order (not longest first): a longer prompt joins, and the batch is padded to it
    joins.clear()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    new = continuous.greedy(
        tiny_model, ids, slots=2, max_new_tokens=12, ends=ends, stopped=gen.RowStop(tokenizer, stop)
    )
    texts = [
        [gen.truncate_at_stop(gen._continuation(tokenizer, i, gen._until(t, ends)), stop)] for i, t in zip(ids, new)
    ]
    assert texts == one and any(busy and width < length for busy, width, length in joins)


def test_models_with_sliding_window_caches_keep_model_generate():
    import types

    assert continuous.supports(types.SimpleNamespace(config=transformers.LlamaConfig(num_hidden_layers=2)))
    sliding = transformers.MistralConfig(num_hidden_layers=2, sliding_window=8)
    assert not continuous.supports(types.SimpleNamespace(config=sliding))


def test_shared_prompt_prefix_is_prefilled_once_with_the_same_outputs(sharp_model, tokenizer, monkeypatch):
    prefix = "Question: what is one and one?\nAnswer: two.\n\nQuestion: and two and two?\nAnswer: four.\n\n"
    prompts = [prefix + p for p in PROMPTS]
    one = generate(sharp_model, tokenizer, prompts, max_new_tokens=8, batch_size=1, stop=["e"], progress=False)
    fed = []
    forward = sharp_model.forward

    def spy(*a, **k):
        fed.append(k["input_ids"].numel())
        return forward(*a, **k)

    monkeypatch.setattr(sharp_model, "forward", spy)
    assert generate(sharp_model, tokenizer, prompts, max_new_tokens=8, batch_size=3, stop=["e"], progress=False) == one
    n_prefix = len(tokenizer(prefix)["input_ids"])
    n_prompts = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert fed[0] >= n_prefix - 1  # the shared tokens first, once
    assert sum(fed) < n_prompts  # prefills and decode steps together fed fewer tokens than the prompts hold
