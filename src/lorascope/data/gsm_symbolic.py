"""GSM8K-style problems from reasoning-gym's ``gsm_symbolic`` generators, without reasoning-gym's declared deps.

reasoning-gym's package ``__init__`` imports every task family (cellpylib, pycosat, ...), which are absent when
it is installed with --no-deps. The gsm_symbolic generators themselves only need ``reasoning_gym.utils``
(standard library only), so we load those three files by path. This mirrors
``GSMSymbolicDataset.__getitem__`` (seeded ``Random(seed + idx)``, template chosen from ``tasks_ok``), minus its
registry plumbing.

CAUTION: the 100 templates are 100 GSM8K *test* problems (ids in resources/gsm8k_symbolic_ids.json); a run that
trains on these must not evaluate GSM8K on those ids.

    >>> ex = generate(3, seed=0)
    >>> ex[0]["template"], ex[0]["answer_cot"].splitlines()[-1].startswith("####")
    (..., True)
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import threading
from collections.abc import Callable
from functools import lru_cache
from random import Random
from types import ModuleType

from ..assets import package_dir, package_file
from ..errors import LorascopeError

_LOCK = threading.Lock()


def _load(name: str, relpath: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, package_file("reasoning_gym", relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=1)
def generators() -> tuple[dict[int, Callable], list[int]]:
    """({template id: generate_<id>(rng, difficulty)}, tasks_ok) read from the installed reasoning-gym."""
    base = "arithmetic/gsm_symbolic/"
    # tasks_ok is a literal list in gsm_symbolic.py, whose imports (reasoning_gym.factory) need the missing deps
    tree = ast.parse(package_file("reasoning_gym", base + "gsm_symbolic.py").read_text())
    tasks_ok = next(
        (
            ast.literal_eval(n.value)
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "tasks_ok" for t in n.targets)
        ),
        None,
    )
    if not tasks_ok:
        raise LorascopeError(f"{package_dir('reasoning_gym')}: gsm_symbolic.py has no tasks_ok list (version?)")
    with _LOCK:
        # The generator files do `from reasoning_gym.utils import ...`: serve that name from the file for the
        # duration of the load, then restore whatever was there (nothing, or the real module).
        prev = sys.modules.get("reasoning_gym.utils")
        try:
            sys.modules["reasoning_gym.utils"] = prev or _load("reasoning_gym.utils", "utils.py")
            mods = [
                _load(f"_lorascope_gsm_symbolic_{i}", base + f)
                for i, f in enumerate(("generators_00_49.py", "generators_50_99.py"))
            ]
        finally:
            if prev is None:
                sys.modules.pop("reasoning_gym.utils", None)
    gens = {int(n[len("generate_") :]): getattr(m, n) for m in mods for n in dir(m) if n.startswith("generate_")}
    return gens, [int(t) for t in tasks_ok]


def generate(n: int, seed: int = 0) -> list[dict]:
    """n problems: {"question", "answer_cot" (ends with '#### <answer>'), "answer", "template"}; deterministic."""
    gens, tasks_ok = generators()
    templates = Random(seed).choices(tasks_ok, k=n)
    out = []
    for idx, t in enumerate(templates):
        ex = gens[t](Random(seed + idx), 1.0)
        cot = ex.get("answer_cot") or ex.get("metadata", {}).get("answer_cot")  # location varies by template
        if not cot:
            raise LorascopeError(f"reasoning-gym gsm_symbolic template {t} gave no answer_cot (version?)")
        out.append({"question": ex["question"], "answer_cot": cot, "answer": str(ex["answer"]), "template": t})
    return out
