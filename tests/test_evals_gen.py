"""Generation tasks on the tiny random Llama: batching equals one-at-a-time, stop strings, seeding, PEFT,
scorers (GSM8K strict/flexible, MATH normalisation), and the HumanEval/MBPP/GSM8K task flow."""

from __future__ import annotations

import json

import pytest
import torch

from lorascope import benchdata
from lorascope.errors import LorascopeError
from lorascope.evals.base import EvalContext
from lorascope.evals.generate import StopOnText, generate, truncate_at_stop

PROMPTS = [
    "def add(a, b):\n",
    "Question: What is 2 + 2?\nAnswer:",
    "Hi",
    "A considerably longer prompt, so that the batch needs left padding for the short ones " * 2,
]


def test_batched_greedy_equals_one_at_a_time(tiny_model, tokenizer):
    one = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1, progress=False)
    many = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    assert one == many
    assert all(len(o) == 1 and o[0] for o in one)


def test_matches_plain_hf_generate(tiny_model, tokenizer):
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    ref = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ref_text = tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    ours = generate(tiny_model, tokenizer, [PROMPTS[1]], max_new_tokens=10, progress=False)[0][0]
    assert ours == ref_text


def test_stop_strings_truncate_and_end_rows(tiny_model, tokenizer):
    free = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    # pick a substring each free completion contains after its start, and use it as a stop string
    stop_text = free[2][0][3:6]
    assert stop_text
    cut = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4, stop=[stop_text], progress=False)
    for f, c in zip(free, cut):
        assert c[0] == truncate_at_stop(f[0], [stop_text])
        assert stop_text not in c[0]
    assert len(cut[2][0]) < len(free[2][0])


def test_stop_criterion_is_per_row(tokenizer):
    ids = [
        tokenizer("x = 1")["input_ids"] + tokenizer("\nclass A")["input_ids"],
        tokenizer("x = 1")["input_ids"] + tokenizer(" + 2 + 3")["input_ids"],
    ]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    start = len(tokenizer("x = 1")["input_ids"]) + width - len(ids[0])
    done = StopOnText(tokenizer, ["\nclass"], start)(batch, None)
    assert done.tolist() == [True, False]
    assert truncate_at_stop("abc\nclass X\ndef", ["\ndef", "\nclass"]) == "abc"


def test_sampling_is_seeded_and_varies(tiny_model, tokenizer):
    kw = dict(max_new_tokens=5, temperature=1.0, top_p=0.95, num_samples=3, batch_size=6, progress=False)
    state = torch.get_rng_state()
    a = generate(tiny_model, tokenizer, PROMPTS[:2], seed=1, **kw)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    b = generate(tiny_model, tokenizer, PROMPTS[:2], seed=1, **kw)
    c = generate(tiny_model, tokenizer, PROMPTS[:2], seed=2, **kw)
    assert a == b and a != c
    assert len(a[0]) == 3 and len(set(a[0])) > 1


def test_bad_generation_settings(tiny_model, tokenizer):
    with pytest.raises(LorascopeError, match="max_new_tokens"):
        generate(tiny_model, tokenizer, ["x"], max_new_tokens=0, progress=False)
    with pytest.raises(LorascopeError, match="top_p"):
        generate(tiny_model, tokenizer, ["x"], temperature=0.5, top_p=0, progress=False)


def test_unmerged_peft_model_generates_like_merged(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(
        tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    unmerged = generate(pm, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    merged = generate(pm.merge_and_unload(), tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    assert unmerged == merged


# ---------------------------------------------------------------- scorers


def test_gsm8k_scoring_follows_lm_eval():
    from lorascope.evals.math_tasks import gsm8k_flexible, gsm8k_shot_text, gsm8k_strict

    assert gsm8k_strict("48/2 = 24\n#### 1,024.") == "1024"
    assert gsm8k_strict("The answer is 72") is None
    assert gsm8k_flexible("First 3 apples, then $1,200.") == "1200"
    assert gsm8k_flexible("no digits") is None
    shot = gsm8k_shot_text(benchdata.gsm8k_fewshot()[0])
    assert shot.startswith("Question: There are 15 trees") and shot.endswith("\n#### 6")


def test_math_normalisation_and_extraction():
    from lorascope.evals.math_tasks import last_boxed, math_equal, math_prediction

    assert last_boxed(r"so $\boxed{\frac{1}{2}}$ and \boxed{x^{2}}") == "x^{2}"
    assert math_equal(r"\dfrac{3}{4}", r"\frac34")
    assert math_equal(r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})")
    assert math_equal("10 \\text{ cm}", "10")
    assert math_equal("x = 5", "5")
    assert math_equal("0.5", r"\frac{1}{2}") and math_equal("3/4", r"\frac{3}{4}")
    assert not math_equal("5", "6") and not math_equal(None, "5")
    assert math_prediction("blah\nFinal Answer: The final answer is $24$. I hope it is correct.") == (
        "$24$",
        "final_answer_line",
    )
    assert math_prediction(r"thus \boxed{7}.") == ("7", "boxed")
    boxed_line = r"The final answer is $\boxed{\dfrac{1}{2}}$. I hope it is correct."
    assert math_prediction(boxed_line) == (r"\dfrac{1}{2}", "final_answer_line")
    assert math_prediction("nothing") == (None, "none")


# ---------------------------------------------------------------- task flow (tiny model; scores are ~0)


def test_code_task_requires_opt_in(tiny_model, tokenizer):
    from lorascope.evals.code_tasks import HumanEval

    with pytest.raises(LorascopeError, match="allow-code-execution"):
        HumanEval().run(EvalContext(model=tiny_model, tokenizer=tokenizer, limit=1))


def test_humaneval_task_end_to_end(tiny_model, tokenizer, tmp_path):
    from lorascope.evals.code_tasks import HumanEval, prompt_style

    ctx = EvalContext(
        model=tiny_model,
        tokenizer=tokenizer,
        limit=2,
        samples=2,
        temperature=0.8,
        allow_code_execution=True,
        out_dir=tmp_path,
        progress=False,
        excluded_ids={"humaneval": ["HumanEval/0"]},
    )
    res = HumanEval(style="completion", max_new_tokens=8).run(ctx)
    assert res.info["prompt_style"] == "completion" and res.info["excluded"] == 1
    assert [s["task_id"] for s in res.samples] == ["HumanEval/1"] * 2 + ["HumanEval/2"] * 2
    assert set(res.metrics) >= {"pass@1", "pass@2", "unique_mean", "unique_passed_mean"}
    assert "pass@10" not in res.metrics  # k > n is not reported
    assert res.metrics["pass@1"] == 0.0 and all(not s["passed"] for s in res.samples)  # random weights
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert lines[0].keys() == {"task_id", "completion"} and len(lines) == 4
    assert prompt_style(tokenizer) == "instruct"  # the SmolLM2 tokenizer has a chat template


def test_humaneval_task_scores_a_model_that_writes_the_solution(tokenizer, monkeypatch):
    """Replace generation by the canonical solution: pass@1 must be 1 (the scoring path is right)."""
    from lorascope.evals import code_tasks as code

    probs = {p["prompt"]: p["canonical_solution"] for p in benchdata.humaneval()}
    monkeypatch.setattr(code, "generate", lambda m, t, prompts, **kw: [[probs[p]] for p in prompts])
    res = code.HumanEval(style="completion").run(
        EvalContext(model=None, tokenizer=tokenizer, limit=5, allow_code_execution=True, progress=False)
    )
    assert res.metrics["pass@1"] == 1.0 and res.metrics["pass@1_stderr"] == 0.0


def test_mbpp_task_scores_reference_code(tokenizer, monkeypatch):
    from lorascope.evals import code_tasks as code

    docs = benchdata.mbpp()[:3]
    by_prompt = {d["olmes_prompt"]: d["code"] for d in docs}
    monkeypatch.setattr(code, "generate", lambda m, t, prompts, **kw: [[by_prompt[p]] for p in prompts])
    res = code.MBPP(style="instruct").run(
        EvalContext(model=None, tokenizer=tokenizer, limit=3, allow_code_execution=True, progress=False)
    )
    assert res.metrics["pass@1"] == 1.0


def test_gsm8k_task_flow(tiny_model, tokenizer, monkeypatch):
    from lorascope.evals import math_tasks as gm

    gold = {d["question"]: d["short_answer"] for d in benchdata.gsm8k()[:6]}
    seen = {}

    def fake(model, tok, prompts, **kw):
        seen["prompts"], seen["stop"] = prompts, kw["stop"]
        out = []
        for i, p in enumerate(prompts):
            q = p.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            out.append([f" blah.\n#### {gold[q]}" if i % 2 == 0 else f" it is {gold[q]} and then 0"])
        return out

    monkeypatch.setattr(gm, "generate", fake)
    res = gm.GSM8K().run(
        EvalContext(model=tiny_model, tokenizer=tokenizer, limit=4, progress=False, excluded_ids={"gsm8k": [0, "1"]})
    )
    assert res.info["excluded"] == 2 and res.info["n"] == 4 and res.info["shots"] == 5
    assert seen["prompts"][0].count("Question:") == 6 and seen["prompts"][0].endswith("\nAnswer:")
    assert res.metrics["exact_match,strict-match"] == 0.5  # items 0, 2 wrote "#### N"
    assert res.metrics["exact_match,flexible-extract"] == 0.5  # items 1, 3 end with "0"
    assert "exact_match_stderr,strict-match" in res.metrics
    assert "Question:" in seen["stop"]
    real = gm.GSM8K(max_new_tokens=4)
    monkeypatch.undo()
    out = real.run(EvalContext(model=tiny_model, tokenizer=tokenizer, limit=2, shots=1, progress=False))
    # the real generator: the metrics are exactly what the sample lines say
    assert out.info["n"] == 2 and out.metrics == res.metrics_of(out.samples)
    assert out.metrics["exact_match,strict-match"] == sum(s["strict_correct"] for s in out.samples) / 2


def test_math500_task_flow(tokenizer, monkeypatch):
    from lorascope.evals import math_tasks as gm

    sol = {d["problem"]: d["solution"] for d in benchdata.math500()[:10]}
    monkeypatch.setattr(
        gm,
        "generate",
        lambda m, t, prompts, **kw: [
            [" " + sol[p.rsplit("Problem:\n", 1)[1].removesuffix("\n\nSolution:")]] for p in prompts
        ],
    )
    res = gm.Math500().run(EvalContext(model=None, tokenizer=tokenizer, limit=3, progress=False))
    assert res.metrics["exact_match,none"] == 1.0 and res.info["shots"] == 4
    assert res.metrics["exact_match,math_verify"] == 1.0 and res.info["math_verify_errors"] == 0

    # answers equal as mathematics but not as normalised strings: only math-verify credits them
    def plus_zero(m, t, prompts, **kw):
        golds = [gm.last_boxed(sol[p.rsplit("Problem:\n", 1)[1].removesuffix("\n\nSolution:")]) for p in prompts]
        return [[f"The final answer is ${{{g}}} + 0$."] for g in golds]

    monkeypatch.setattr(gm, "generate", plus_zero)
    # "(a, b) + 0" is no number: skip the tuple answers
    tuples = [d["id"] for d in benchdata.math500()[:10] if "," in gm.last_boxed(d["solution"])]
    res = gm.Math500().run(
        EvalContext(model=None, tokenizer=tokenizer, limit=3, progress=False, excluded_ids={"math500": tuples})
    )
    assert res.metrics["exact_match,none"] == 0.0
    assert res.metrics["exact_match,math_verify"] == 1.0
    assert res.metrics == res.metrics_of(res.samples)
    with pytest.raises(LorascopeError, match="shots"):
        gm.Math500().run(EvalContext(model=None, tokenizer=tokenizer, limit=1, shots=9))


def test_math_verify_judges_equivalence_and_never_falls_back(tokenizer, monkeypatch):
    import sys

    from lorascope.evals.math_tasks import Math500, math_equal, math_verify_equal

    # symbolic equality the Hendrycks string match cannot see, and the cases both reject
    assert math_verify_equal("x(x+2)", "x^2+2x") and not math_equal("x(x+2)", "x^2+2x")
    assert math_verify_equal(r"\frac{6}{4}", "1.5") and not math_equal(r"\frac{6}{4}", "1.5")
    assert math_verify_equal("3", "4") is False and math_verify_equal(None, "4") is False
    monkeypatch.setitem(sys.modules, "math_verify", None)  # the package missing: an error, not the other metric
    with pytest.raises(LorascopeError, match="math-verify"):
        math_verify_equal("1", "1")
    with pytest.raises(LorascopeError, match="math-verify"):
        Math500().run(EvalContext(model=None, tokenizer=tokenizer, limit=1, progress=False))


def test_registry_knows_generation_tasks():
    from lorascope.evals import registry

    for name in ("humaneval", "mbpp", "gsm8k", "math500"):
        assert registry.build(name).name == name
