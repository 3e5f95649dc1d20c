"""Task names -> task objects, from the catalog's "module:attribute" of each (lorascope.evals.catalog). Task
modules are imported only when a task is built, so listing and validating names is cheap.

The attribute is called with no argument, or, for names with an argument such as ``heldout_bpb:code-cpt``,
with the part after the first ":" (the catalog's ``argument`` says whether it is required).

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
from .catalog import TASKS


def _shown(name: str, argument: str | None) -> str:
    if not argument:
        return name
    return f"{name}[:{argument.strip('[]')}]" if argument.startswith("[") else f"{name}:{argument}"


def names() -> list[str]:
    """Known task names, with their argument: ``heldout_bpb:<dataset>``, ``kl_base[:<tokens>]``."""
    return sorted(_shown(n, t.argument) for n, t in TASKS.items())


def _split(name: str) -> tuple[str, str | None]:
    base, sep, arg = name.partition(":")
    return base, (arg if sep else None)


def validate(name: str) -> None:
    """Raise LorascopeError naming the known tasks if ``name`` is not one (no imports)."""
    base, arg = _split(name)
    if base not in TASKS:
        raise LorascopeError(f"unknown task '{name}'; known tasks: {', '.join(names())}")
    wants = TASKS[base].argument
    if wants and not wants.startswith("[") and not arg:
        raise LorascopeError(f"task '{base}' needs an argument: {base}:{wants}")
    if not wants and arg is not None:
        raise LorascopeError(f"task '{base}' takes no ':{arg}' argument")


def build(name: str):
    """The Task object for a name (imports its module)."""
    validate(name)
    base, arg = _split(name)
    module, _, attr = TASKS[base].impl.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(arg) if arg is not None else factory()
