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
