"""Scoring engine: every shortcut it takes gives lm-eval's naive per-choice numbers (relational tests on the tiny
random Llama), and each shortcut really removes work (counted in tokens or rows, never timed)."""

from __future__ import annotations

import pytest
import torch

from lorascope.evals import engine
from lorascope.evals.engine import Request, encode_pair, score, score_naive
from lorascope.evals.multiple_choice import ArcChallenge, HellaSwag, WinoGrande

SHOTS = (
    "Question: What is the capital of France?\nAnswer: Paris\n\n"
    "Question: Which is bigger, a cat or a mouse?\nAnswer: a cat\n\n"
)


def _requests():
    reqs = [
        Request("Question: Is water wet?\nAnswer:", [" yes", " no", " maybe so, indeed"]),
        Request("", [" hello world"]),
        Request("A", [" b", "c d e"]),
        Request("The quick brown fox  ", ["jumps", " over the lazy dog"]),
    ]
    reqs += [
        Request(
            SHOTS + f"Question: item {i} asks something{'?' * i}\nAnswer:",
            [f" choice {j}" * (j + 1) for j in range(3 + i % 3)],
            shared_prefix=SHOTS,
        )
        for i in range(6)
    ]
    return reqs


def _max_diff(a, b) -> float:
    return max(abs(x[0] - y[0]) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


class _Count:
    """Counts tokens entering the model (embedding inputs) and rows entering the vocabulary head."""

    def __init__(self, model):
        self.tokens, self.head_rows, self.passes, self.graphs = 0, 0, 0, 0
        engine.pass_overhead(model)  # the start-up timing passes are not the work being counted
        self.handles = [
            model.model.embed_tokens.register_forward_hook(self._embed),
            model.lm_head.register_forward_hook(self._head),
        ]

    def _embed(self, _m, inp, _out):
        self.tokens += inp[0].numel()
        self.passes += 1

    def _head(self, _m, inp, out):
        self.head_rows += inp[0].shape[:-1].numel()
        self.graphs += out.requires_grad  # scoring never builds an autograd graph

    def close(self):
        for h in self.handles:
            h.remove()


def test_encode_pair_moves_trailing_whitespace(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer:  ", "yes")
    assert tokenizer.decode(ctx) == "Answer:"
    assert tokenizer.decode(cont) == "  yes"


def test_engine_matches_naive(tiny_model, tokenizer):
    reqs = _requests()
    fast = score(tiny_model, tokenizer, reqs, batch_size=3)
    ref = score_naive(tiny_model, tokenizer, reqs, batch_size=5)
    assert [len(r) for r in fast] == [len(r.continuations) for r in reqs]
    assert _max_diff(fast, ref) <= 1e-4
    assert [g for r in fast for _, g in r] == [g for r in ref for _, g in r]
    assert all(ll < 0 for r in fast for ll, _ in r)
    # one sequence per pass: several chunks, contexts and choices split across passes
    assert _max_diff(score(tiny_model, tokenizer, reqs, batch_size=1), ref) <= 1e-4


@pytest.mark.parametrize("shots", [0, 2])
def test_engine_matches_naive_on_shipped_tasks(tiny_model, tokenizer, shots):
    """The three forgetting tasks' own requests (partial scoring, few-shot block, redraws) score as naive."""
    reqs, spans = [], []
    for task in (HellaSwag(), ArcChallenge(), WinoGrande()):
        items = [task.to_item(d) for d in task.load(task.split)[:6]]
        prefixes = task._fewshot(items, shots, seed=0)
        for it in items:
            r = task.requests(it, prefixes[it.id])
            spans.append(len(r))
            reqs += r
    fast = score(tiny_model, tokenizer, reqs, batch_size=4)
    ref = score_naive(tiny_model, tokenizer, reqs, batch_size=8)
    assert _max_diff(fast, ref) <= 1e-3

    def preds(res):  # per item: argmax over its choices, whichever request layout the task uses
        out, at = [], 0
        for n in spans:
            lls = [ll for r in res[at : at + n] for ll, _ in r]
            out.append(lls.index(max(lls)))
            at += n
        return out

    assert preds(fast) == preds(ref)


def test_contexts_longer_than_the_window_are_cut_as_lm_eval_cuts_them(tiny_model, tokenizer):
    """lm-eval keeps the last window of context + continuation per continuation: choices of different lengths
    then see different contexts, and the engine must score each with its own."""
    tiny_model.config.max_position_embeddings = 48  # the window max_length() reads; RoPE itself is unchanged
    long = SHOTS * 3 + "Question: which one?\nAnswer:"
    reqs = [
        Request(long, [" a", " a much longer answer than the first one", " mid length"], shared_prefix=SHOTS),
        Request(long + " so", [" b", " yes it is"], shared_prefix=SHOTS),
    ]
    assert len(engine._tokenize(tokenizer, reqs[0], 48)) == 3
    assert _max_diff(score(tiny_model, tokenizer, reqs), score_naive(tiny_model, tokenizer, reqs)) <= 1e-4


def test_passes_cover_rows_in_order_within_budget():
    lengths = [40, 38, 12, 11, 11, 10, 3, 3]
    order = list(range(len(lengths)))
    passes = engine._passes(order, lengths, budget=100, overhead=64)
    assert [r for p in passes for r in p] == order
    assert all(len(p) * lengths[p[0]] <= 100 for p in passes)
    # the long rows do not drag the short ones into a padded pass; the short ones share passes
    assert passes[0] == [0, 1] and len(passes) < len(order)
    # a row longer than the budget still gets its own pass
    assert engine._passes([0, 1], [500, 5], budget=100)[0] == [0]
    # a cheap pass (small overhead) buys less padding: more passes than an expensive one
    assert len(engine._passes(order, lengths, 1000, overhead=1)) > len(engine._passes(order, lengths, 1000, 500))


class _TimedModel(torch.nn.Module):
    """A model whose pass takes fixed + per_token x tokens seconds on a fake clock."""

    def __init__(self, clock: list[float], fixed: float, per_token: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.clock, self.fixed, self.per_token = clock, fixed, per_token

    def forward(self, input_ids, use_cache=False, logits_to_keep=1):
        self.clock[0] += self.fixed + self.per_token * input_ids.shape[1]


def test_pass_overhead_is_the_fixed_cost_in_tokens_measured_once_per_model(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    cheap, dear = _TimedModel(clock, 0.010, 0.001), _TimedModel(clock, 0.100, 0.001)
    # time = fixed + per_token x tokens: the fixed cost is 10 and 100 tokens' worth
    assert engine.pass_overhead(cheap) == pytest.approx(10) and engine.pass_overhead(dear) == pytest.approx(100)
    dear.fixed = 1.0
    assert engine.pass_overhead(dear) == pytest.approx(100)  # cached: a model's pass plan never changes mid-run


def test_shared_prefix_cache_same_numbers_and_fewer_tokens(tiny_model, tokenizer, monkeypatch):
    reqs = [r for r in _requests() if r.shared_prefix]
    plain = [Request(r.context, r.continuations) for r in reqs]
    monkeypatch.setattr(engine, "MIN_SIBLING", 10**9)  # the group cache alone, no sibling sharing
    c = _Count(tiny_model)
    with_cache = score(tiny_model, tokenizer, reqs, batch_size=2)
    n_cached, c.tokens = c.tokens, 0
    without = score(tiny_model, tokenizer, plain, batch_size=2)
    c.close()
    assert _max_diff(with_cache, without) <= 1e-4
    assert n_cached < c.tokens  # the few-shot block was computed once, not per item


def test_winogrande_contexts_share_the_text_before_the_blank(tiny_model, tokenizer, monkeypatch):
    task = WinoGrande()
    reqs = [r for d in task.load(task.split)[:8] for r in task.requests(task.to_item(d), "")]
    c = _Count(tiny_model)

    def run(overhead: float, sharing: bool):
        monkeypatch.setitem(engine._OVERHEAD, tiny_model, overhead)
        monkeypatch.setattr(engine, "MIN_SIBLING", 4 if sharing else 10**9)
        c.tokens = 0
        return score(tiny_model, tokenizer, reqs, batch_size=4), c.tokens

    (shared, n_shared), (alone, n_alone) = run(1.0, True), run(1.0, False)
    # a costly pass (as timed on a loaded CPU) is not spent on a few shared tokens: the pairs then run alone
    (costly, n_costly), (_, n_costly_alone) = run(10_000.0, True), run(10_000.0, False)
    c.close()
    assert _max_diff(shared, alone) <= 1e-4 and _max_diff(costly, alone) <= 1e-4
    assert _max_diff(shared, score_naive(tiny_model, tokenizer, reqs)) <= 1e-4
    assert n_shared < 0.85 * n_alone  # the common text ran once per pair
    assert n_costly == n_costly_alone


def test_vocabulary_head_runs_only_at_scored_positions(tiny_model, tokenizer, monkeypatch):
    """The head runs on the scored positions only, in blocks of at most BLOCK_ROWS rows (shrunk here so that a
    pass takes several), never on the module's own path (which would take the whole pass)."""
    from lorascope.evals import vocab_head

    reqs = _requests()
    items = [it for r in reqs for it, _ in engine._tokenize(tokenizer, r, 1024)]
    monkeypatch.setattr(vocab_head, "BLOCK_ROWS", 7)
    monkeypatch.setattr(vocab_head.VocabHead, "check", lambda self, model: None)  # its probe is not scoring
    chunks, real = [], vocab_head.VocabHead._reduce_rows
    monkeypatch.setattr(
        vocab_head.VocabHead, "_reduce_rows", lambda self, x, *a: (chunks.append(len(x)), real(self, x, *a))[1]
    )
    c = _Count(tiny_model)
    res = score(tiny_model, tokenizer, reqs, batch_size=3)
    c.close()
    assert sum(chunks) == sum(len(t) for it in items for t in it.conts) and max(chunks) <= 7 < sum(chunks)
    assert c.head_rows == 0 and c.graphs == 0
    assert _max_diff(res, score_naive(tiny_model, tokenizer, reqs)) <= 1e-4


def test_requests_of_several_tasks_share_passes(tiny_model, tokenizer):
    a = [Request(SHOTS + f"Question: {w}?\nAnswer:", [" yes", " no"], shared_prefix=SHOTS) for w in "abc"]
    other = "Sentence: the sky is blue.\n\nSentence: grass is green.\n\n"
    b = [Request(other + f"Sentence: {w} is", [" red", " gray"], shared_prefix=other) for w in ("snow", "soot")]
    c = _Count(tiny_model)
    apart = score(tiny_model, tokenizer, a, batch_size=8) + score(tiny_model, tokenizer, b, batch_size=8)
    passes_apart, c.passes = c.passes, 0
    together = score(tiny_model, tokenizer, a + b, batch_size=8)
    c.close()
    assert _max_diff(apart, together) <= 1e-4
    assert c.passes < passes_apart


def test_engine_deterministic_and_batch_size_independent(tiny_model, tokenizer):
    reqs = _requests()[:6]
    a = score(tiny_model, tokenizer, reqs, batch_size=2)
    b = score(tiny_model, tokenizer, reqs, batch_size=8)
    assert _max_diff(a, b) <= 1e-4
    assert score(tiny_model, tokenizer, reqs, batch_size=8) == b


def test_unmerged_lora_scores_like_merged(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(
        tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    reqs = _requests()
    unmerged = score(peft_model, tokenizer, reqs)
    merged = score(peft_model.merge_and_unload(), tokenizer, reqs)
    assert _max_diff(unmerged, merged) <= 1e-4
