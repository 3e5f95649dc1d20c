"""The training estimate's pace: the first steps are timed as they are, the rest at the median of the later ones."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest


def _trainer(step_s: list[float]):
    """A stand-in for train.loop.Trainer whose steps take the given wall seconds (sleeping: no CPU)."""
    done = []

    def run_step(step, mult):
        time.sleep(step_s[len(done)])
        done.append(step)

    return SimpleNamespace(
        plan=SimpleNamespace(total=100), t=SimpleNamespace(tokens_per_step=1000), run_step=run_step, lr_mult=lambda s: 1
    )


def test_the_first_steps_slowness_is_paid_once_not_taken_as_the_pace():
    from lorascope.train.estimate import FIRST_STEPS, measure

    slow, fast = [0.60, 0.40], 0.05
    m = measure(_trainer(slow + [fast] * 3), steps=4)
    assert FIRST_STEPS == 2 and len(m["step_wall_s"]) == 5
    assert m["tokens_per_s"] == pytest.approx(
        1000 / fast, rel=0.5
    )  # sleeps overshoot on a busy machine  # the median of the later steps
    # what the first two took beyond that pace: a real run of N steps costs N x pace + this
    assert m["first_steps_extra_s"] == pytest.approx(sum(slow) - 2 * fast, abs=0.15)
    even = measure(_trainer([fast] * 5), steps=4)
    assert even["first_steps_extra_s"] < 0.15 < m["first_steps_extra_s"]


def test_kl_jobs_of_runs_that_train_the_head_cost_the_moved_head_time():
    from lorascope.config import RunConfig
    from lorascope.study.evalestimate import job_seconds, moves_head

    study = SimpleNamespace(evals=SimpleNamespace(groups=[SimpleNamespace(tasks=["heldout_bpb:code-cpt", "kl_base"])]))
    cost = {"task_s": {"heldout_bpb:code-cpt": 30.0, "kl_base": 20.0}, "moved_head_s": {"kl_base": 27.0}, "load_s": 2}
    job = {"kind": "eval", "run": "r1"}
    assert job_seconds(study, job, cost) == 52.0 and job_seconds(study, job, cost, moved_head=True) == 59.0
    assert job_seconds(study, {"kind": "eval", "run": None}, cost, moved_head=True) == 32.0  # the base: no KL
    cfg = {"model": "embedded", "data": {"dataset": "code-cpt"}}
    full, lora = RunConfig.model_validate({**cfg, "method": {"kind": "full"}}), RunConfig.model_validate(cfg)
    head = RunConfig.model_validate({**cfg, "method": {"kind": "lora", "train_lm_head": True}})
    assert moves_head(full) and moves_head(head) and not moves_head(lora)


def test_head_moved_unties_for_a_while_and_gives_the_weight_back(tokenizer):
    import torch
    from conftest import make_tiny_llama

    from lorascope.evals.kl import same_head
    from lorascope.evals.vocab_head import VocabHead
    from lorascope.study.evalestimate import _head_moved

    model, base = make_tiny_llama(len(tokenizer), seed=0), make_tiny_llama(len(tokenizer), seed=0)
    tied = model.get_output_embeddings().weight
    assert same_head(VocabHead(base), VocabHead(model))
    with _head_moved(model):
        assert not same_head(VocabHead(base), VocabHead(model))  # the KL takes the moved-head path
        assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert model.get_output_embeddings().weight is tied and same_head(VocabHead(base), VocabHead(model))
