"""Math word problems by generation: GSM8K (lm-eval's gsm8k scoring) and MATH-500 (Minerva prompt, boxed answers).

GSM8K, as lm-evaluation-harness ``gsm8k.yaml``: k-shot (default 5) ``"Question: {q}\\nAnswer: {a}"`` blocks
joined by blank lines, then ``"Question: {q}\\nAnswer:"``; greedy, at most 256 new tokens, stop at
``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` (and ``"\\n\\nQuestion:"``). The GSM8K train split is not shipped
offline, so the shots are the 8 chain-of-thought exemplars of Wei et al. (the first k), rewritten into the
train split's answer format: ``"... So the answer is 6."`` becomes ``"...\\n#### 6"``, so strict-match works.
Two scores, as lm-eval:

- ``exact_match,strict-match``: the first ``#### N`` of the completion;
- ``exact_match,flexible-extract``: the last number in the completion;
both compared with the gold ``#### N`` after removing ",", "$", a trailing "." and anything up to "#### ",
case-insensitively. Items in ``ctx.excluded_ids["gsm8k"]`` (e.g. the GSM8K problems that reasoning-gym's
gsm_symbolic templates were made from) are skipped, and ``info["excluded"]`` says how many.

MATH-500: Minerva's 4-shot prompt (``"Problem:\\n{p}\\n\\nSolution: {s}"`` blocks, each solution ending with
"Final Answer: The final answer is $X$. I hope it is correct.") or 0-shot (``shots=0``); greedy, stop at
``"Problem:"``. The predicted answer is the text after "The final answer is" when the model wrote that line,
else the content of its last ``\\boxed{}`` (``info`` counts both); the gold answer is the last ``\\boxed{}`` of
the reference solution. Both go through Hendrycks' MATH normalisation (``strip_string``: spaces, ``\\left``/
``\\right``, units, ``dfrac``/``tfrac``->``frac``, ``\\frac12``->``\\frac{1}{2}``, ``a/b``->``\\frac{a}{b}``, ...)
and must then be equal: ``exact_match,none``. A second metric, ``exact_match,math_verify``, judges the same two
extracted answers by symbolic equivalence (math-verify, sympy-based: "0.5" = "\\frac{1}{2}", "x(x+2)" = "x^2+2x");
an answer math-verify cannot parse counts as wrong and ``info["math_verify_errors"]`` counts them. It never
falls back to the string match: without the package the task stops with an error.

Example::

    >>> gsm8k_strict("so 3 + 3 = 6\\n#### 6"), gsm8k_flexible("The answer is 1,000.")
    ('6', '1000')
    >>> math_equal("\\\\dfrac{1}{2}", "\\\\frac12")
    True
"""

from __future__ import annotations

import re
import threading

from .. import benchdata
from ..errors import LorascopeError
from .base import EvalContext, GenerativeTask, TaskResult
from .generate import generate
from .results import items_in_split, mean_stderr, select_items

GSM8K_STOP = ["\n\nQuestion:", "Question:", "</s>", "<|im_end|>"]
MATH_STOP = ["Problem:", "</s>", "<|im_end|>"]

# ---------------------------------------------------------------- GSM8K

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [r",", r"\$", r"(?s).*#### ", r"\.$"]


def _gsm_norm(s: str) -> str:
    for pat in _IGNORE:
        s = re.sub(pat, "", s)
    return s.strip().lower()


def gsm8k_strict(completion: str) -> str | None:
    """lm-eval strict-match: the first ``#### N``, normalised; None if there is none."""
    m = _STRICT.search(completion)
    return _gsm_norm(m.group(1)) if m else None


def gsm8k_flexible(completion: str) -> str | None:
    """lm-eval flexible-extract: the last number-like match, normalised; None if there is none."""
    found = _FLEX.findall(completion)
    if not found:
        return None
    g = found[-1]
    return _gsm_norm(g[0] or g[1])


def gsm8k_shot_text(shot: dict) -> str:
    """A Wei et al. exemplar in GSM8K train format ("... So the answer is N." -> "...\\n#### N")."""
    m = re.fullmatch(r"(?s)(.*?)\s*So the answer is (.*?)\.?", shot["answer"].strip())
    if not m:
        raise LorascopeError(f"unexpected GSM8K exemplar answer: {shot['answer'][-60:]!r}")
    return f"Question: {shot['question']}\nAnswer: {m.group(1)}\n#### {m.group(2)}"


def _metric(name: str, values: list[float]) -> dict[str, float]:
    mu, se = mean_stderr(values)
    base, _, filt = name.partition(",")
    return {name: mu, f"{base}_stderr,{filt}": se}


def _select_and_generate(
    ctx: EvalContext, name: str, all_docs: list[dict], max_new_tokens: int, stop: list[str], prompt_of
) -> tuple[list[dict], list, int]:
    """The items left after exclusions and the limit, the completions of each, and how many were excluded."""
    excluded = ctx.excluded_ids.get(name, [])
    docs = items_in_split(select_items(all_docs, excluded, ctx.limit), ctx.split, name)
    if not docs:
        raise LorascopeError(f"{name}: no items left to evaluate (limit/excluded ids)")
    comps = generate(
        ctx.model,
        ctx.tokenizer,
        [prompt_of(d) for d in docs],
        max_new_tokens=max_new_tokens,
        stop=stop,
        batch_size=ctx.batch_size,
        seed=ctx.seed,
        progress=ctx.progress,
        desc=f"{name} generate",
    )
    return docs, comps, len(all_docs) - len(select_items(all_docs, excluded, None))


class GSM8K(GenerativeTask):
    name = "gsm8k"
    max_new_tokens = 256

    def prompt_prefix(self, shots: int) -> str:
        pool = benchdata.gsm8k_fewshot()
        if shots > len(pool):
            raise LorascopeError(f"gsm8k: shots must be <= {len(pool)} (the exemplars available offline), got {shots}")
        return "".join(gsm8k_shot_text(s) + "\n\n" for s in pool[:shots])

    def run(self, ctx: EvalContext) -> TaskResult:
        shots = 5 if ctx.shots is None else ctx.shots
        prefix = self.prompt_prefix(shots)
        docs, comps, n_excluded = _select_and_generate(
            ctx,
            self.name,
            benchdata.gsm8k(),
            self.max_new_tokens,
            GSM8K_STOP,
            lambda d: f"{prefix}Question: {d['question']}\nAnswer:",
        )
        samples = []
        for d, (c,) in zip(docs, comps):
            gold = _gsm_norm(d["answer"])
            ps, pf = gsm8k_strict(c), gsm8k_flexible(c)
            samples.append(
                {
                    "id": d["id"],
                    "completion": c,
                    "gold": gold,
                    "strict": ps,
                    "flexible": pf,
                    "strict_correct": ps == gold,
                    "flexible_correct": pf == gold,
                }
            )
        info = {
            "n": len(docs),
            "shots": shots,
            "excluded": n_excluded,
            "fewshot_source": "Wei et al. CoT exemplars in '#### N' format",
            "stop": GSM8K_STOP,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
        }
        return TaskResult(metrics=self.metrics_of(samples), samples=samples, info=info, metrics_of=self.metrics_of)

    @staticmethod
    def metrics_of(samples: list[dict]) -> dict[str, float]:
        return {
            **_metric("exact_match,strict-match", [float(s["strict_correct"]) for s in samples]),
            **_metric("exact_match,flexible-extract", [float(s["flexible_correct"]) for s in samples]),
        }


# ---------------------------------------------------------------- MATH (Hendrycks normalisation)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        rest = text[i:].split("\\boxed ", 1)  # "\boxed 5"
        return rest[1].split("$")[0].strip() if len(rest) == 2 else None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


def _fix_fracs(s: str) -> str:
    subs = s.split("\\frac")
    out = subs[0]
    for sub in subs[1:]:
        out += "\\frac"
        if sub.startswith("{") or len(sub) < 2:
            out += sub
            continue
        a, b, rest = sub[0], sub[1], sub[2:]
        out += f"{{{a}}}{b}{rest}" if b == "{" else f"{{{a}}}{{{b}}}{rest}"
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def strip_string(s: str) -> str:
    """Hendrycks et al.'s MATH answer normalisation (``math_equivalence.strip_string``)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    if "\\text{ " in s:  # units: "5 \text{ cm}" -> "5"
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0]) <= 2:  # "x = 5" -> "5"
        s = parts[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_equal(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    return strip_string(pred) == strip_string(gold)


def _math_verify():
    """math-verify's (parse, verify); a missing package stops the task instead of turning this metric into the
    string match."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise LorascopeError(
            "math500: the metric exact_match,math_verify needs the 'math-verify' package "
            "(pip install math-verify==0.9.0)"
        ) from None
    return parse, verify


def math_verify_equal(pred: str | None, gold: str | None) -> bool | None:
    """Symbolic equivalence of two answers by math-verify (sympy): True / False, None if it could not decide
    (a parse error, nothing parseable, or a timeout; counted as wrong and reported). Both sides are the extracted
    answers the Hendrycks match compares, so the two metrics differ only in how equality is judged."""
    parse, verify = _math_verify()
    if pred is None or gold is None:
        return False
    # math-verify times out with SIGALRM, which only the main thread may set
    t = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=t, raise_on_error=True)
        p = parse(f"${pred}$", parsing_timeout=t, raise_on_error=True)
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=t, raise_on_error=True))
    except Exception:  # parser and sympy errors of many types on malformed LaTeX
        return None


_FINAL = re.compile(r"The final answer is (.*?)\.?\s*(?:I hope it is correct|$)", re.S)


def math_prediction(completion: str) -> tuple[str | None, str]:
    """(answer, how): Minerva's "The final answer is X" if present, else the last \\boxed{}."""
    m = _FINAL.search(completion)
    if m:
        ans = m.group(1).strip()
        # "The final answer is $\\boxed{5}$": the box is markup, not part of the answer (as Minerva's normaliser)
        return (last_boxed(ans) or ans), "final_answer_line"
    b = last_boxed(completion)
    return (b, "boxed") if b is not None else (None, "none")


class Math500(GenerativeTask):
    name = "math500"
    max_new_tokens = 512

    def run(self, ctx: EvalContext) -> TaskResult:
        _math_verify()  # before generating: its absence is an error, not a fallback
        shots = 4 if ctx.shots is None else ctx.shots
        pool = benchdata.math500_fewshot()
        if shots not in (0, *range(1, len(pool) + 1)):
            raise LorascopeError(f"math500: shots must be between 0 and {len(pool)}, got {shots}")
        prefix = "".join(f"Problem:\n{s['problem']}\n\nSolution: {s['solution']}\n\n" for s in pool[:shots])
        docs, comps, n_excluded = _select_and_generate(
            ctx,
            self.name,
            benchdata.math500(),
            self.max_new_tokens,
            MATH_STOP,
            lambda d: f"{prefix}Problem:\n{d['problem']}\n\nSolution:",
        )
        samples, how_counts = [], {"final_answer_line": 0, "boxed": 0, "none": 0}
        for d, (c,) in zip(docs, comps):
            gold = last_boxed(d["solution"])
            pred, how = math_prediction(c)
            how_counts[how] += 1
            verified = math_verify_equal(pred, gold)
            samples.append(
                {
                    "id": d["id"],
                    "level": d["level"],
                    "completion": c,
                    "pred": pred,
                    "gold": gold,
                    "extracted_from": how,
                    "correct": math_equal(pred, gold),
                    "correct_math_verify": bool(verified),
                    "math_verify_error": verified is None,
                }
            )
        info = {
            "n": len(docs),
            "shots": shots,
            "excluded": n_excluded,
            "answer_extraction": how_counts,
            "stop": MATH_STOP,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
            "normalisation": {
                "exact_match,none": "Hendrycks strip_string",
                "exact_match,math_verify": "math-verify (sympy equivalence)",
            },
            "math_verify_errors": sum(s["math_verify_error"] for s in samples),
        }
        return TaskResult(metrics=self.metrics_of(samples), samples=samples, info=info, metrics_of=self.metrics_of)

    @staticmethod
    def metrics_of(samples: list[dict]) -> dict[str, float]:
        return {
            **_metric("exact_match,none", [float(s["correct"]) for s in samples]),
            **_metric("exact_match,math_verify", [float(s["correct_math_verify"]) for s in samples]),
        }
