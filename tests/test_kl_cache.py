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
REL = 1e-3  # the cached KL against the two-pass KL, relative (kl_cache's docstring)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path))
    return tmp_path / "kl-base"


def _pair(tokenizer, head_too: bool = True):
    """A base and a "fine-tune" of it: every weight moved a little (full FT), or all but the tied embedding /
    head (an adapter that leaves lm_head alone); KL is clearly > 0 either way."""
    base = make_tiny_llama(len(tokenizer), seed=0)
    tuned = make_tiny_llama(len(tokenizer), seed=0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if head_too or "embed" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return base, tuned


def _close(got, want, least: float = 0.01):
    """Per text, the KL sums within REL of the two-pass ones (and the counts equal); KL > ``least`` per token."""
    for (s, n, fs, fn), (s2, n2, fs2, fn2) in zip(want, got):
        assert (n, fn) == (n2, fn2) and s + fs > least * (n + fn)
        assert abs(s - s2) <= REL * abs(s) and abs(fs - fs2) <= REL * abs(fs)


@pytest.mark.parametrize("head_too", [True, False], ids=["head-moved", "head-kept"])
def test_cached_kl_equals_two_pass_kl_and_runs_the_base_once(tokenizer, cache, monkeypatch, head_too):
    """Both of the cache's paths: a tuned head (the base logits again from the cached hidden states) and the
    base's own head (one pass, ent - s.h + logsumexp); the second never runs the base's head at all."""
    from lorascope.evals import kl
    from lorascope.evals.kl import kl_per_text

    base, tuned = _pair(tokenizer, head_too)
    two_pass = kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=False)  # window 16: sliding rows
    calls, rows_p = [], []
    base.register_forward_hook(lambda *a: calls.append(1))
    real = kl.kl_between
    monkeypatch.setattr(kl, "kl_between", lambda hp, p, *a: (rows_p.append(len(p)), real(hp, p, *a))[1])
    first = kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=True)
    built = len(calls)
    again = kl_per_text(tuned, base, tokenizer, TEXTS, window=16, cache=True)
    assert built > 0 and len(calls) == built  # the second checkpoint never runs the base model
    assert len(list(cache.glob("*.npy"))) == 1
    assert first == again
    _close(first, two_pass)
    assert (sum(rows_p) > 0) == head_too  # the base's logits are recomputed only where the heads differ


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
    threads = [threading.Thread(target=lambda: got.append(kl_cache.base_side(base, rows, 2))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(got) == 3
    assert all(np.array_equal(g, got[0]) for g in got)
    hidden = base.config.hidden_size  # [h | W^T p | sum p log p] per scored position: no vocabulary-wide row
    assert got[0].shape == (kl_cache.row_offsets(rows)[-1], 2 * hidden + 1) and got[0].dtype == np.float64


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
    from lorascope.evals.token_windows import PACK_WIDTH, pack_width, packed_batches, target_hidden, windows
    from lorascope.evals.vocab_head import VocabHead

    model = make_tiny_llama(len(tokenizer), seed=1)
    head = VocabHead(model)
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
        h, spans = target_hidden(model, rows, b, pad=2)
        logits = torch.cat([z.clone() for _, z in head.chunks(h)])
        for r, c in spans.items():
            _, inp, tgt, _ = rows[r]
            alone = model(input_ids=torch.tensor([inp])).logits[0, len(inp) - len(tgt) :]
            got = logits[c]
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
        kl_cache.base_side(make_tiny_llama(len(tokenizer)), windows(tokenizer, TEXTS, 16, 8), 2)
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*tmp"))


def test_kl_rows_in_chunks_equals_the_whole_formula(monkeypatch):
    from lorascope.evals import kl_cache

    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(37, 101, generator=g) * 3, torch.randn(37, 101, generator=g) * 3
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    whole = (lp.exp() * (lp - lq)).sum(-1)
    monkeypatch.setattr(kl_cache, "CHUNK_BYTES", 4 * 101 * 5)  # 5 positions a chunk: 8 chunks, the last short
    assert len(list(kl_cache.row_chunks(37, 101))) == 8
    assert torch.allclose(kl_cache.kl_rows(p_logits, q_logits), whole, atol=1e-6)


def test_vocab_head_gives_the_heads_own_logits_through_one_buffer(tokenizer, monkeypatch):
    """Chunk after chunk, batch after batch, the logits through the one reused buffer equal the head's own; the
    NLL and argmax equal log_softmax's; a head that is not a plain Linear runs through its module; a model whose
    logits are post-processed unknown to VocabHead is refused, a soft-capped one reproduced."""
    from lorascope.evals import vocab_head

    model = make_tiny_llama(len(tokenizer), seed=2)
    monkeypatch.setattr(vocab_head, "HEAD_CHUNK_BYTES", 4 * len(tokenizer) * 5)  # 5 rows a chunk
    # reductions: 4 rows x 1,000 columns a block, so 50 vocabulary blocks (the last of 152) and several row blocks
    monkeypatch.setattr(vocab_head, "BLOCK_ROWS", 4)
    monkeypatch.setattr(vocab_head, "VOCAB_BLOCK_BYTES", 4 * 4 * 1000)
    head = vocab_head.VocabHead(model)
    lm = model.get_output_embeddings()
    seen = set()
    for n in (3, 12, 23):
        h = torch.randn(n, model.config.hidden_size)
        parts = []
        for c, z in head.chunks(h):
            assert c.stop - c.start <= 5
            seen.add(z.untyped_storage().data_ptr())
            parts.append(z.clone())
        want = lm(h)
        assert torch.allclose(torch.cat(parts), want, atol=1e-5)
        t = torch.randint(0, len(tokenizer), (n,))
        nll, hit = head.nll(h, t, greedy=True)
        lp = torch.log_softmax(want, -1)
        assert torch.allclose(nll, -lp.gather(1, t[:, None])[:, 0], atol=1e-5)
        assert torch.equal(hit, lp.argmax(-1) == t)
    assert len(seen) == 1  # one buffer for every chunk of every batch
    model.set_output_embeddings(torch.nn.Sequential(lm))  # another head type: its own module, same logits
    other = vocab_head.VocabHead(model)
    h = torch.randn(7, model.config.hidden_size)
    assert not other.plain and torch.allclose(torch.cat([z for _, z in other.chunks(h)]), lm(h), atol=1e-5)
    t = torch.randint(0, len(tokenizer), (7,))
    assert torch.allclose(other.nll(h, t), head.nll(h, t), atol=1e-5)  # the chunked path, the blocked one
    model.set_output_embeddings(lm)
    capped = make_tiny_llama(len(tokenizer), seed=2)
    capped.config.final_logit_softcapping = 3.0
    real = type(capped).forward

    def forward(self, *a, **k):  # a model that soft-caps its logits after the head, as Gemma 2 does
        out = real(self, *a, **k)
        out.logits = torch.tanh(out.logits / 3.0) * 3.0
        return out

    monkeypatch.setattr(type(capped), "forward", forward)
    h = torch.randn(3, model.config.hidden_size)
    next(vocab_head.VocabHead(capped).chunks(h))  # reproduced: no error at the first use
    capped.config.final_logit_softcapping = None
    vocab_head._CHECKED.pop(capped, None)
    with pytest.raises(ValueError, match="post-processed"):
        next(vocab_head.VocabHead(capped).chunks(h))


def test_kl_with_a_head_shared_by_model_and_reference_is_not_overwritten(tokenizer):
    """A model and a reference holding one head module (e.g. a model and its own base modules): each side's
    logits have their own buffer, so the KL equals that with a copy of the head."""
    import copy

    from lorascope.evals import kl

    model = make_tiny_llama(len(tokenizer), seed=0, tie=False)
    reference = make_tiny_llama(len(tokenizer), seed=1, tie=False)
    reference.lm_head = copy.deepcopy(model.lm_head)
    want = kl.kl_per_text(model, reference, tokenizer, TEXTS, cache=False)
    reference.lm_head = model.lm_head
    got = kl.kl_per_text(model, reference, tokenizer, TEXTS, cache=False)
    assert got == want and sum(s for s, *_ in want) > 0


@pytest.mark.integration
@pytest.mark.parametrize("head_too", [True, False], ids=["head-moved", "head-kept"])
def test_embedded_model_cached_kl_within_1e3_of_the_two_pass_kl(tmp_path, monkeypatch, head_too):
    """The embedded model against a copy of it with every weight (or all but the tied embedding) moved by 1% of
    its spread: the KL from the cache within REL of the two-pass KL, in total and per text."""
    import copy

    from lorascope.evals import kl_cache
    from lorascope.evals.kl import kl_per_text, select_texts
    from lorascope.models import load_base

    monkeypatch.setattr(kl_cache, "cache_dir", lambda: tmp_path)  # the model's own cache stays where it is
    base, tok = load_base("embedded")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if (head_too or "embed" not in name) and p.dim() == 2:
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    texts = [d["text"] for d in select_texts(tok, 300)]
    want = kl_per_text(tuned, base, tok, texts, cache=False)
    got = kl_per_text(tuned, base, tok, texts, cache=True)
    assert len(list((tmp_path / "kl-base").glob("*.npy"))) == 1
    _close(got, want, least=1e-3)  # measured: ~0.005 nats per token
    total, total2 = sum(s + fs for s, _, fs, _ in want), sum(s + fs for s, _, fs, _ in got)
    assert abs(total2 - total) <= REL * total


def test_kl_between_two_heads_in_vocabulary_blocks_equals_the_whole_formula(tokenizer, monkeypatch):
    """Two different heads over 2 row blocks x 50 vocabulary blocks (the last one short): the online KL equals
    log-softmax on the whole logits; the base head against itself gives 0."""
    from lorascope.evals import kl_cache, vocab_head

    monkeypatch.setattr(vocab_head, "BLOCK_ROWS", 4)
    monkeypatch.setattr(vocab_head, "VOCAB_BLOCK_BYTES", 4 * 4 * 1000)
    p_model = make_tiny_llama(len(tokenizer), seed=0, tie=False)
    q_model = make_tiny_llama(len(tokenizer), seed=1, tie=False)
    hp, hq = vocab_head.VocabHead(p_model), vocab_head.VocabHead(q_model)
    g = torch.Generator().manual_seed(0)
    xp, xq = (torch.randn(7, p_model.config.hidden_size, generator=g) * 4 for _ in range(2))
    assert vocab_head.blockable(hp, xp, hq, xq)
    got = vocab_head.kl_between(hp, xp, hq, xq)
    want = kl_cache.kl_rows(p_model.lm_head(xp), q_model.lm_head(xq))
    assert want.min() > 0.01 and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    again = vocab_head.VocabHead(p_model)  # a head object each side: each has its own buffer
    assert torch.allclose(vocab_head.kl_between(hp, xp, again, xp), torch.zeros(7), atol=1e-5)
