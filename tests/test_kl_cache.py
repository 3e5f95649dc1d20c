"""The base side of KL is computed once and cached: the cached KL equals the two-pass KL, the cache is reused,
keyed by weights and texts, built once under parallel demand; packed text scoring equals per-text scoring."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

TEXTS = [
    "The cat sat on the mat and looked at the door for a long while.",
    "Rain fell over the hills; the farmers waited.",
    "A short one.",
    "Water boils at one hundred degrees Celsius at sea level, a fact every cook relies on.",
]
TOL = 1e-4  # nats per token: float16 base log-probs (see kl_cache's docstring)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path))
    return tmp_path / "kl-base"


def _pair(tokenizer):
    base = make_tiny_llama(len(tokenizer), seed=0)
    tuned = make_tiny_llama(len(tokenizer), seed=0)
    with torch.no_grad():  # a "fine-tune": every weight moved a little, so KL is clearly > 0
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, tuned


def test_cached_kl_equals_two_pass_kl_and_runs_the_base_once(tokenizer, cache):
    from lorascope.evals.kl import kl_per_text

    base, tuned = _pair(tokenizer)
    two_pass = kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=False)  # window 16: sliding rows
    calls = []
    base.register_forward_hook(lambda *a: calls.append(1))
    first = kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=True)
    built = len(calls)
    again = kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=True)
    assert built > 0 and len(calls) == built  # the second checkpoint never runs the base model
    assert len(list(cache.glob("*.npy"))) == 1
    assert first == again
    for (s, n, fs, fn), (s2, n2, fs2, fn2) in zip(two_pass, first):
        assert (n, fn) == (n2, fn2) and s + fs > 0.01 * (n + fn)
        assert abs(s - s2) <= TOL * n and abs(fs - fs2) <= TOL * fn


def test_cache_key_follows_weights_and_texts_not_names(tokenizer, cache):
    from lorascope.evals import kl_cache
    from lorascope.evals.kl import kl_per_text

    base, tuned = _pair(tokenizer)
    kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=True)
    kl_per_text(tuned, make_tiny_llama(len(tokenizer), seed=0), tokenizer, TEXTS, window=16, cache=True)  # same
    moved = make_tiny_llama(len(tokenizer), seed=0)
    moved.config._name_or_path = "/another/cache/dir/model"  # the same weights read from elsewhere
    kl_per_text(tuned, moved, tokenizer, TEXTS, window=16, cache=True)
    assert kl_per_text(tuned, base, tokenizer, TEXTS[1:], window=16) and not kl_cache.worth_caching(base)  # tiny: off
    assert len(list(cache.glob("*.npy"))) == 1
    with torch.no_grad():
        next(base.parameters())[0, 0] += 1e-3  # one weight of another base model
    kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=True)
    kl_per_text(tuned, base, tokenizer, TEXTS[:2], window=16, cache=True)  # another text set
    assert len(list(cache.glob("*.npy"))) == 3
    assert not list(cache.glob(".*tmp"))  # no temp file left behind


def test_parallel_requests_build_the_cache_once(tokenizer, cache, monkeypatch):
    from lorascope.evals import kl_cache
    from lorascope.evals.token_windows import windows

    base, _ = _pair(tokenizer)
    rows = windows(tokenizer, TEXTS, 16, 8)
    builds, real = [], kl_cache._build
    monkeypatch.setattr(kl_cache, "_build", lambda *a: (builds.append(1), real(*a)))
    got = []
    threads = [threading.Thread(target=lambda: got.append(kl_cache.base_logprobs(base, rows, 2))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(got) == 3
    assert all(np.array_equal(g, got[0]) for g in got)
    assert got[0].shape == (kl_cache.row_offsets(rows)[-1], len(tokenizer)) and got[0].dtype == np.float16


def test_kl_base_with_a_token_count_is_the_forgetting_metric():
    from lorascope.evals.catalog import forgetting_metric, spec

    plain, sized = spec("kl_base"), spec("kl_base:2000")
    assert sized.task == "kl_base:2000" and (sized.metric, sized.role, sized.weight_field, sized.higher_better) == (
        plain.metric,
        plain.role,
        plain.weight_field,
        plain.higher_better,
    )
    assert forgetting_metric(["english_bpb", "kl_base:2000"]) == "kl_base:2000"
    assert forgetting_metric(["english_bpb", "hellaswag"]) == "english_bpb"


def test_packed_rows_score_as_if_alone(tokenizer):
    from lorascope.evals.token_windows import PACK_WIDTH, pack_width, packed_batches, target_logits, windows

    model = make_tiny_llama(len(tokenizer), seed=1)
    rows = windows(tokenizer, TEXTS, 16, 8)  # rows of 4..16 tokens, the longer texts in sliding windows
    plan = packed_batches(rows, budget=64, width=24)
    alone_plan = packed_batches(rows, budget=64, width=0)  # attention kernels without 4D masks: a row each
    assert all(len(s) == 1 for b in alone_plan for s in b) and pack_width(model) == PACK_WIDTH
    model.config._attn_implementation = "flash_attention_2"
    assert pack_width(model) == 0
    model.config._attn_implementation = "sdpa"
    seqs = [s for b in plan for s in b]
    assert sorted(r for s in seqs for r in s) == list(range(len(rows)))  # every row once
    assert len(seqs) < len(rows) and any(len(s) > 1 for s in seqs)  # rows do share sequences
    assert all(sum(len(rows[r][1]) for r in s) <= 24 for s in seqs)
    assert all(len(b) * max(sum(len(rows[r][1]) for r in s) for s in b) <= 64 or len(b) == 1 for b in plan)
    for b in plan + alone_plan:
        for r, got in target_logits(model, rows, b, pad=2).items():
            _, inp, tgt, _ = rows[r]
            alone = model(input_ids=torch.tensor([inp])).logits[0, len(inp) - len(tgt) :]
            assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-5)  # no leakage, same positions


def test_a_full_disk_is_one_clear_error_and_leaves_no_file(tokenizer, cache, monkeypatch):
    import shutil
    from collections import namedtuple

    from lorascope.errors import LorascopeError
    from lorascope.evals import kl_cache
    from lorascope.evals.token_windows import windows

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(LorascopeError, match="kl-base: kl_base's base-model cache needs .* GB free"):
        kl_cache.base_logprobs(make_tiny_llama(len(tokenizer)), windows(tokenizer, TEXTS, 16, 8), 2)
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*tmp"))


def test_kl_rows_in_chunks_equals_the_whole_formula(monkeypatch):
    from lorascope.evals import kl_cache, token_windows

    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(37, 101, generator=g) * 3, torch.randn(37, 101, generator=g) * 3
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    whole = (lp.exp() * (lp - lq)).sum(-1)
    monkeypatch.setattr(token_windows, "CHUNK_BYTES", 4 * 101 * 5)  # 5 positions a chunk: 8 chunks, the last short
    assert len(list(token_windows.row_chunks(37, 101))) == 8
    assert torch.allclose(kl_cache.kl_rows(p_logits, q_logits), whole, atol=1e-6)
    stored = kl_cache.log_probs_f16(p_logits)  # the cache's float16 rows, renormalised when read
    assert np.array_equal(stored, lp.to(torch.float16).numpy())
    assert torch.allclose(kl_cache.kl_rows(stored, q_logits), whole, atol=2e-3)


def test_reused_head_output_gives_the_heads_own_logits_batch_after_batch(tokenizer):
    """Every batch's logits through the one reused buffer equal the head's own (to the bit), the buffer is
    allocated once for batches of every size, and the head is itself again afterwards; heads that are not a
    plain Linear are left alone."""
    from lorascope.evals.token_windows import packed_batches, padded_tokens, reused_head_output, target_logits, windows

    model = make_tiny_llama(len(tokenizer), seed=2)
    rows = windows(tokenizer, TEXTS, 8, 4)
    plan = packed_batches(rows, budget=64, width=16)
    assert len({padded_tokens(rows, b) for b in plan}) > 1  # batches of several sizes
    want = [{r: t.clone() for r, t in target_logits(model, rows, b, pad=2).items()} for b in plan]
    head = model.get_output_embeddings()
    with reused_head_output(model, max(padded_tokens(rows, b) for b in plan)):
        seen = set()
        for b, w in zip(plan, want):
            got = target_logits(model, rows, b, pad=2)
            seen |= {t.untyped_storage().data_ptr() for t in got.values()}
            assert got.keys() == w.keys() and all(torch.equal(got[r], w[r]) for r in w)
        assert len(seen) == 1
    assert "forward" not in vars(head)
    wrapped = torch.nn.Sequential(head)
    model.set_output_embeddings(wrapped)
    with reused_head_output(model, 64):
        assert "forward" not in vars(wrapped) and "forward" not in vars(head)


def test_kl_with_a_head_shared_by_model_and_reference_is_not_overwritten(tokenizer, monkeypatch):
    """A model and a reference holding one head module (e.g. a model and its own base modules): the reference's
    pass must not overwrite the model's logits in the reused buffer."""
    from lorascope.evals import kl, token_windows

    model = make_tiny_llama(len(tokenizer), seed=0, tie=False)
    reference = make_tiny_llama(len(tokenizer), seed=1, tie=False)
    reference.lm_head = model.lm_head
    got = kl.kl_per_text(model, reference, tokenizer, TEXTS, cache=False)
    monkeypatch.setattr(kl, "reused_head_output", lambda m, n: token_windows.reused_head_output(m, 0))
    want = kl.kl_per_text(model, reference, tokenizer, TEXTS, cache=False)
    assert got == want and sum(s for s, *_ in want) > 0
