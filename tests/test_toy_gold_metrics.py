"""The toy world's gold metrics as OverOptimizationWatch uses them (`update(images, prompts)`, class_path in a
config), replacing the wrappers guardrl.gold.ToyPassRate / ToyOffPalette had: one of them passed
`quantize=True` to a class that takes `quantized` and silently computed the strict pass rate."""

from __future__ import annotations

import pytest
import torch

from guardrl.toy.gold import OffPaletteFraction, VerifierPassRate
from guardrl.toy.grammar import split_prompts
from guardrl.toy.render import render_batch

PROMPTS = list(split_prompts("train"))[:16]


@pytest.fixture(scope="module")
def renders():
    return render_batch(PROMPTS, list(range(len(PROMPTS))))


def _computed(metric, images):
    metric.update(images, PROMPTS)  # the watch's call
    return float(metric.compute())


def test_clean_renders_pass_both_ways_and_are_on_palette(renders):
    assert _computed(VerifierPassRate(), renders) == 1.0
    assert _computed(VerifierPassRate(quantized=True), renders) == 1.0
    assert _computed(OffPaletteFraction(), renders) == 0.0


def test_quantized_differs_from_strict_where_colours_drift(renders):
    """+0.4 on the red channel moves pixels past the verifier's 0.35 colour tolerance: 8 of these 16 renders
    fail the strict check (measured), while quantizing to the nearest palette colour first restores all 16."""
    shifted = (renders + 0.4 * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).clamp(0, 1)
    strict = _computed(VerifierPassRate(), shifted)
    quantized = _computed(VerifierPassRate(quantized=True), shifted)
    assert strict == 0.5
    assert quantized == 1.0
    # the background (0.3 grey-ish) moves off palette too: almost every pixel
    assert _computed(OffPaletteFraction(), shifted) > 0.9


def test_the_watch_builds_them_from_a_config(tmp_path):
    """As `--trainer.callbacks` builds OverOptimizationWatch's `gold: list[Metric]`."""
    from jsonargparse import ArgumentParser
    from torchmetrics import Metric

    parser = ArgumentParser()
    parser.add_argument("--gold", type=list[Metric])
    config = parser.parse_args(
        [
            "--gold",
            '[{"class_path": "guardrl.toy.gold.VerifierPassRate", "init_args": {"quantized": true}},'
            ' {"class_path": "guardrl.toy.gold.OffPaletteFraction"}]',
        ]
    )
    metrics = parser.instantiate_classes(config).gold
    assert isinstance(metrics[0], VerifierPassRate) and metrics[0].quantized is True
    assert isinstance(metrics[1], OffPaletteFraction)


def test_the_metrics_with_errors_give_gold_metrics_values(renders):
    """gold_metrics_with_errors computes each value once itself (one verification per mode, features once,
    the bootstrap over feature rows): its four headline values are gold_metrics' exactly."""
    from guardrl.toy.gold import GOLD_DIRECTIONS, gold_metrics, gold_metrics_with_errors

    generator = torch.Generator().manual_seed(0)
    images = (renders + 0.8 * torch.rand(renders.shape, generator=generator) - 0.4).clamp(0, 1)
    real = render_batch(PROMPTS, [s + 1000 for s in range(len(PROMPTS))])
    expected = gold_metrics(images, PROMPTS, real)
    values = gold_metrics_with_errors(images, PROMPTS, real, bootstrap=5, seed=3)
    assert {name: values[name] for name in GOLD_DIRECTIONS} == expected
    assert 0 < values["off_palette_fraction"] < 1 and values["realism_distance"] > 0
    assert values["realism_distance_se"] > 0 and values["off_palette_fraction_se"] > 0
