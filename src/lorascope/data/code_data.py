"""Code datasets: ``code-cpt`` (raw Python source) and ``code-ift`` (instruction -> Python solution).

Each builder returns ``(train_docs, heldout_docs, sources, heldout_groups)``; CPT documents are strings, IFT
documents ``{"prompt", "response"}`` dicts; ``heldout_groups[i]`` is the unit held-out document i was held out
with (its package, e.g. "stdlib/email"), or None where documents are held out one by one.

    train, heldout, sources, groups = code_cpt()   # ~1,900 stdlib + sympy/mpmath/networkx/jinja2 files
    train, heldout, sources, groups = code_ift()   # CodeI/O tasks + docstring->function pairs, HumanEval-like

Docstring -> body pairs follow HumanEval's format: the prompt is the imports the function uses, its
signature and docstring; the response is the whole function in a fenced block (what lorascope's instruct
HumanEval prompt asks an instruct model to write).
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

from tqdm import tqdm

from ..assets import package_dir
from .files import assign, code_files, code_sources, is_heldout, library_cluster, package_version, read_text


def code_cpt() -> tuple[list, list, list, list]:
    """Real Python source (StarCoder-Python stand-in); whole top-level packages held out."""
    train, heldout, groups = [], [], []
    for group, f in tqdm(code_files(), desc="code-cpt: reading files", unit="file", leave=False):
        text = read_text(f)
        if text and text.strip():
            assign(text, group, train, heldout, groups, library_cluster(group))
    return train, heldout, code_sources(), groups


def _codeio(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        head = fh.read(1)
        fh.seek(0)
        if head == "[":  # codeio-hq.jsonl.gz is, despite its name, one JSON array
            return json.load(fh)
        return [json.loads(line) for line in fh if line.strip()]


def codeio_pairs() -> list[dict]:
    """reasoning-gym's CodeI/O items (every codeio*.jsonl.gz), deduplicated on the prompt, in file order."""
    files = sorted((package_dir("reasoning_gym") / "data").glob("codeio*.jsonl.gz"))
    seen, out = set(), []
    for path in files:
        for r in _codeio(path):
            prompt = (
                f"{r['task_description'].strip()}\n\n{r['input_output_spec'].strip()}\n\n"
                "Write a Python function `main_solution` that solves this."
            )
            if prompt not in seen:
                seen.add(prompt)
                out.append({"prompt": prompt, "response": f"```python\n{r['code_sample'].strip()}\n```"})
    return out


MIN_DOC_CHARS, MAX_BODY_LINES, MIN_BODY_LINES = 40, 40, 2


def _imports_used(tree: ast.Module, lines: list[str], fn_src: str) -> list[str]:
    """Top-level import statements that bind a name the function's source mentions (HumanEval-style header)."""
    used = set(re.findall(r"[A-Za-z_]\w*", fn_src))
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
            if any(n in used for n in names):
                out.append("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    return out


def docstring_pairs(text: str) -> list[dict]:
    """HumanEval-format pairs from a module's top-level functions that have a docstring.

    Kept: module-level (not methods: their ``self`` context is missing), public, docstring >= 40 chars,
    2-40 body lines after the docstring, no decorators (they change semantics the prompt would not show).
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc or len(doc.strip()) < MIN_DOC_CHARS or len(node.body) < 2:
            continue
        doc_node = node.body[0]
        body_start, end = node.body[1].lineno, node.end_lineno
        if not (MIN_BODY_LINES <= end - body_start + 1 <= MAX_BODY_LINES):
            continue
        fn_src = "\n".join(lines[node.lineno - 1 : end])
        header = "\n".join(lines[node.lineno - 1 : doc_node.end_lineno])
        if "\t" in fn_src:  # mixed tabs make the prompt/response indentation ambiguous
            continue
        imports = _imports_used(tree, lines, fn_src)
        prefix = "\n".join(imports) + "\n\n\n" if imports else ""
        out.append({"prompt": prefix + header + "\n", "response": f"```python\n{prefix}{fn_src}\n```"})
    return out


def code_ift() -> tuple[list, list, list, list]:
    """CodeI/O instruction -> solution pairs + docstring -> function pairs mined from the code corpus.

    CodeI/O pairs are held out by a hash of the prompt; mined pairs by their package (as code-cpt), so a
    held-out docstring pair never comes from a package whose other functions were trained on.
    """
    train, heldout = [], []
    for ex in codeio_pairs():
        (heldout if is_heldout(ex["prompt"]) else train).append(ex)
    n_codeio = len(train) + len(heldout)
    groups: list = [None] * len(heldout)  # CodeI/O items are held out one by one
    seen = set()
    for group, f in tqdm(code_files(), desc="code-ift: mining docstrings", unit="file", leave=False):
        text = read_text(f)
        for ex in docstring_pairs(text) if text else []:
            if ex["prompt"] not in seen:  # vendored copies of the same function
                seen.add(ex["prompt"])
                assign(ex, group, train, heldout, groups, library_cluster(group))
    sources = [
        {
            "name": "reasoning-gym CodeI/O (codeio*.jsonl.gz)",
            "version": package_version("reasoning-gym"),
            "licence": "Apache-2.0",
            "documents": n_codeio,
        },
        {
            "name": "docstring -> function pairs mined from the code-cpt corpus",
            "from": code_sources(),
            "documents": len(train) + len(heldout) - n_codeio,
        },
    ]
    return train, heldout, sources, groups
