"""Task names -> factories. Task modules are imported only when a task is built, so listing names is cheap.

A value is ``"module:attribute"``; the attribute is called with no argument, or, for parametric names such as
``heldout_bpb:code-cpt``, with the part after the first ":" (``heldout_bpb`` must then accept one argument).

Example::

    >>> from lorascope.evals.registry import build, names
    >>> "hellaswag" in names()
    True
    >>> build("heldout_bpb:code-cpt").name
    'heldout_bpb:code-cpt'
"""

from __future__ import annotations

import importlib

from ..errors import LorascopeError

TASKS: dict[str, str] = {
    # forgetting (source-domain) benchmarks, lm-eval prompt formats
    "hellaswag": "lorascope.evals.multiple_choice:HellaSwag",
    "arc_challenge": "lorascope.evals.multiple_choice:ArcChallenge",
    "arc_easy": "lorascope.evals.multiple_choice:ArcEasy",
    "winogrande": "lorascope.evals.multiple_choice:WinoGrande",
    # continuous proxies
    "humaneval_bpb": "lorascope.evals.bpb:HumanEvalBPB",
    "mbpp_bpb": "lorascope.evals.bpb:MbppBPB",
    "gsm8k_bpb": "lorascope.evals.bpb:Gsm8kBPB",
    "math500_bpb": "lorascope.evals.bpb:Math500BPB",
    "english_bpb": "lorascope.evals.bpb:EnglishBPB",
    "kl_base": "lorascope.evals.kl:KLBase",  # optional argument: kl_base:<tokens>
    "heldout_bpb": "lorascope.evals.bpb:HeldoutBPB",  # parametric: heldout_bpb:<dataset>
    # generation tasks (learning benchmarks)
    "humaneval": "lorascope.evals.code_tasks:HumanEval",
    "mbpp": "lorascope.evals.code_tasks:MBPP",
    "gsm8k": "lorascope.evals.math_tasks:GSM8K",
    "math500": "lorascope.evals.math_tasks:Math500",
    # any lm-evaluation-harness task: lm_eval:<task>[@learning|@forgetting]
    "lm_eval": "lorascope.evals.lm_eval_task:LmEvalTask",
}

PARAMETRIC = {"heldout_bpb": "<dataset>", "lm_eval": "<task>[@learning|@forgetting]"}
OPTIONAL_ARG = {"kl_base"}  # called with no argument, or with the part after ":"


def names() -> list[str]:
    """Known task names; parametric ones are shown as ``name:<arg>``."""
    return sorted(
        f"{n}:{PARAMETRIC[n]}" if n in PARAMETRIC else f"{n}[:<tokens>]" if n in OPTIONAL_ARG else n for n in TASKS
    )


def _split(name: str) -> tuple[str, str | None]:
    base, sep, arg = name.partition(":")
    return base, (arg if sep else None)


def validate(name: str) -> None:
    """Raise LorascopeError naming the known tasks if ``name`` is not one (no imports)."""
    base, arg = _split(name)
    if base not in TASKS:
        raise LorascopeError(f"unknown task '{name}'; known tasks: {', '.join(names())}")
    if base in PARAMETRIC and not arg:
        raise LorascopeError(f"task '{base}' needs an argument: {base}:{PARAMETRIC[base]}")
    if base not in PARAMETRIC.keys() | OPTIONAL_ARG and arg is not None:
        raise LorascopeError(f"task '{base}' takes no ':{arg}' argument")


def build(name: str):
    """The Task object for a name (imports its module)."""
    validate(name)
    base, arg = _split(name)
    module, _, attr = TASKS[base].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(arg) if arg is not None else factory()
