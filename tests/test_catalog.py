"""The task catalog is the one home of a task's facts: every record names a factory that builds that task, and
what the record says (generation or log-likelihood, reference model, code execution) is what the task does."""

import subprocess
import sys

import pytest

from lorascope.evals import registry
from lorascope.evals.base import GenerativeTask
from lorascope.evals.catalog import GENERATION, TASKS, info, spec, uses_reference


def _example(name: str) -> str:
    arg = TASKS[name].argument
    if name == "lm_eval":  # a task lm-eval ships (its config only is read when the task is built)
        return "lm_eval:arc_easy@forgetting"
    return name if not arg or arg.startswith("[") else f"{name}:code-cpt"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_record_builds_its_task_and_says_how_it_scores(name):
    task = registry.build(_example(name))
    assert task.name.partition(":")[0] == name
    assert isinstance(task, GenerativeTask) == (TASKS[name].scoring == GENERATION)


def test_reference_and_code_execution_are_read_from_the_record():
    assert uses_reference("kl_base") and uses_reference("kl_base:2000") and not uses_reference("english_bpb")
    assert {n for n, t in TASKS.items() if t.executes_code} == {"humaneval", "mbpp"}
    assert info("heldout_bpb:code-cpt") is TASKS["heldout_bpb"] and info("nope") is None


def test_the_api_refuses_code_execution_by_the_catalog(tmp_path):
    from lorascope.errors import LorascopeError
    from lorascope.evals.api import _build

    with pytest.raises(LorascopeError, match="allow-code-execution"):
        _build(["mbpp"], allow_code_execution=False)
    assert _build(["mbpp_bpb"], allow_code_execution=False)  # the gold-solution BPB runs no code


def test_names_show_required_and_optional_arguments():
    shown = registry.names()
    assert "heldout_bpb:<dataset>" in shown and "kl_base[:<tokens>]" in shown and "hellaswag" in shown
    with pytest.raises(Exception, match="needs an argument"):
        registry.validate("heldout_bpb")
    with pytest.raises(Exception, match="takes no"):
        registry.validate("hellaswag:x")
    registry.validate("kl_base")
    registry.validate("kl_base:10")


def test_spec_reads_the_record():
    for name, t in TASKS.items():
        s = spec(name)
        assert (s.metric, s.higher_better, s.role, s.item_field) == (t.metric, t.higher_better, t.role, t.item_field)
    assert spec("forgetting_mean").role == "forgetting" and spec("unknown_task") is None


def test_catalog_imports_no_torch():
    code = "import sys, lorascope.evals.catalog, lorascope.evals.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
