"""Does it train? The cheapest setting of the learning benchmark (docs/learning.md) where learning is certain:
the toy model, JPEG compressibility, lr 3e-3, 16 iterations of 2 prompts x 8 samples, 6 sampler steps.
flow_grpo and grpo_guard must raise the evaluation reward (32 fixed training prompts with fixed noise, the
same for every run of the seed) by MARGIN more than the null control with the same seeds, and must raise it at
all; the same check must fail when the training signal is broken on purpose (advantages with their sign
flipped; a backward pass that never reaches the LoRA), so that it cannot pass by drift or by accident.

Measured here (gain in kB of JPEG, iteration 0 -> 16; start -1.51): flow_grpo +0.223, grpo_guard +0.215, null
control -0.056 (random updates make images less compressible), flipped advantages -0.223, no gradient 0.000
(the policy never moves). MARGIN = 0.15 sits between the real variants' 0.27-0.28 above the null and the
no-gradient run's 0.056."""

from __future__ import annotations

import csv
import dataclasses
import os

import pytest

import guardrl.module
from guardrl.toy.learning import Run, Settings, eval_gain, run_one

pytestmark = pytest.mark.slow

SETTINGS = Settings(
    iterations=16,
    prompts_per_batch=2,
    group_size=8,
    minibatch_size=16,
    num_train_timesteps=3,
    num_inference_steps=6,
    window=3,
    eval_every=16,
    eval_prompts=32,
)
LR = 3e-3
SEED = 0
REWARD = "jpeg"
MARGIN = 0.15  # kB of JPEG above the null control's gain
MINIMUM = 0.1  # and the reward itself must rise (a run that never moves must not pass on the null's drift)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy")


def _gain(out: str, variant: str, name: str | None = None) -> float:
    """Run one benchmark run in this process and return its evaluation gain."""
    run = Run(REWARD, variant, SEED, LR)
    if name is not None:  # a broken run gets its own folder
        out = os.path.join(out, name)
    run_one(run, dataclasses.replace(SETTINGS), CONFIGS, out)
    directory = os.path.join(out, "runs", run.name)
    with open(os.path.join(directory, "evaluations.csv"), newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert [r["iteration"] for r in rows] == [0, SETTINGS.iterations]
    return eval_gain(rows)


def _learns(gain: float, null_gain: float) -> bool:
    return gain - null_gain > MARGIN and gain > MINIMUM


@pytest.fixture(scope="module")
def null_gain(tmp_path_factory) -> float:
    return _gain(str(tmp_path_factory.mktemp("learning")), "null_control")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", ["flow_grpo", "grpo_guard"])
def test_variant_learns_against_the_null_control(variant, null_gain, tmp_path):
    gain = _gain(str(tmp_path), variant)
    assert _learns(gain, null_gain), (variant, gain, null_gain)


@pytest.mark.timeout(600)
def test_flipped_advantages_do_not_pass(null_gain, tmp_path, monkeypatch):
    import guardrl.run_advantages

    real = guardrl.run_advantages.group_advantages  # where the iteration's advantages are computed
    monkeypatch.setattr(guardrl.run_advantages, "group_advantages", lambda *a, **k: -real(*a, **k))
    gain = _gain(str(tmp_path), "flow_grpo", "flipped")
    assert not _learns(gain, null_gain), (gain, null_gain)
    assert gain < null_gain  # it learns the opposite way


@pytest.mark.timeout(600)
def test_a_gradient_that_never_reaches_the_lora_does_not_pass(null_gain, tmp_path, monkeypatch):
    monkeypatch.setattr(guardrl.module.GRPOModule, "manual_backward", lambda self, loss, *a, **k: None)
    gain = _gain(str(tmp_path), "flow_grpo", "no_gradient")
    assert not _learns(gain, null_gain), (gain, null_gain)
    assert gain == 0.0  # the policy never moved: the same images as at iteration 0
