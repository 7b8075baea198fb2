"""bench/gpu_bench.py drives every model's published shape (issue 19): `--count-only` counts each full-shape
transformer on the meta device against the size its model card publishes, and every model key runs the
CPU-small path (bare transformer and one GRPO iteration through guardrl) end to end. SD3.5-Medium and
FLUX.1-dev's small runs are tests/test_random_weights.py's."""

from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, BENCH)
    try:
        import gpu_bench
    finally:
        sys.path.remove(BENCH)
    return gpu_bench


# The transformer's weights as counted on the meta device (the state dict: SD3's position table included),
# the size its model card publishes (rounded as the card rounds it), and the exact forward FLOPs of one
# 512 px image without CFG (guardrl.perf.FlopCounter: matmuls and attention). The counts are the ones
# tests/test_random_weights.py, test_qwen_image.py, test_flux2_klein.py and test_z_image.py assert on the
# models' own builders; FLUX.1-Kontext-dev is FLUX.1-dev's transformer, its forward twice the image tokens.
COUNTS = {
    "sd35m": (2_469_663_936, "2.5 B", 2_442_642_604_032, "1024", 333),
    "sd35l": (8_146_280_768, "8.1 B", 7_977_786_393_600, "1024", 333),
    "flux": (11_901_408_320, "12 B", 21_502_600_151_040, "1024", 512),
    "qwen_image": (20_430_401_088, "20 B", 22_638_730_149_888, "1024", 512),
    "flux2_klein_4b": (3_875_544_576, "4 B", 10_172_971_352_064, "1024", 512),
    "flux2_klein_9b": (9_078_581_248, "9 B", 22_731_720_491_008, "1024", 512),
    "z_image_turbo": (6_154_908_736, "6.15 B", 18_533_625_757_696, "1024", 512),
    "flux_kontext": (11_901_408_320, "12 B", 37_661_072_424_960, "1024 + 1024", 512),
}


def test_every_model_key_is_benchmarked_with_its_recipe(gpu_bench):
    assert list(gpu_bench.BACKBONES) == list(COUNTS)
    assert set(gpu_bench.RECIPES) == set(gpu_bench.PUBLISHED_BILLIONS) == set(COUNTS)
    for kind, recipe in gpu_bench.RECIPES.items():
        assert os.path.isfile(os.path.join(gpu_bench.REPO_ROOT, recipe)), kind


@pytest.mark.parametrize("kind", list(COUNTS))
def test_count_only_prints_each_models_published_size(gpu_bench, kind, capsys):
    weights, published, flops, image_tokens, text_tokens = COUNTS[kind]
    (row,) = gpu_bench.main(["--count-only", "--models", kind])["count"]
    assert row["weights"] == weights and row["matches_published"]
    assert row["forward_flops"] == flops and row["text_tokens"] == text_tokens
    if kind.startswith("sd35"):  # without SD3's position table, a buffer in diffusers
        assert row["parameters"] == {"sd35m": 2_243_171_520, "sd35l": 8_056_627_520}[kind]
    else:
        assert row["parameters"] == weights  # no buffers
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == (
        f"| {kind} | {row['parameters'] / 1e9:.3f} B | {weights:,} | {published} (matches) | "
        f"{flops / 1e12:.3f} | {image_tokens} | {text_tokens} |"
    )


# What --small picks on a CPU, at 64 px, one repeat and one timed iteration (tests/test_random_weights.py).
SMALL_RUN = [
    "--resolution", "64", "--batch", "4", "--group-size", "2", "--minibatch", "2", "--steps", "4",
    "--matmul-size", "256", "--repeats", "1", "--iterations", "1",
]  # fmt: skip
# Per model: the bare rows, the recipe's LoRA rank and the SDE steps an iteration trains (4 sampler steps:
# GRPO-Guard trains all 3 SDE steps; the Flow-Factory recipes a random window of 1), and which bare rollout
# is the recipe's (SD3.5 and Qwen-Image guide with true CFG; Flux, Kontext: an embedding; the distilled
# klein and Z-Image-Turbo: none).
SMALL = {
    "sd35l": (["rollout", "rollout + CFG"], 32, 3, "rollout + CFG"),
    "qwen_image": (["rollout", "rollout + CFG"], 64, 1, "rollout + CFG"),
    "flux2_klein_4b": (["rollout"], 64, 1, "rollout"),
    "flux2_klein_9b": (["rollout"], 64, 1, "rollout"),
    "z_image_turbo": (["rollout"], 64, 1, "rollout"),
    "flux_kontext": (["rollout"], 64, 1, "rollout"),
}


@pytest.mark.parametrize("kind", list(SMALL))
def test_every_model_runs_its_cpu_small_path(gpu_bench, kind):
    rollouts, rank, steps, recipe_rollout = SMALL[kind]
    tables = gpu_bench.main(["--small", *SMALL_RUN, "--models", kind])
    bare, iteration = tables["bare"], tables["iteration"]
    assert [r["phase"] for r in bare] == [*rollouts, f"update, one step (LoRA r{rank})"]
    update = f"update (LoRA r{rank}, 2 minibatches x {steps} steps + KL reference forwards)"
    assert [r["phase"] for r in iteration] == ["rollout", "decode", "reward", update, "whole iteration"]
    assert {r["model"] for r in bare + iteration} == {kind}
    for row in bare + iteration:
        assert row["seconds"] > 0 and row["batch"] in (2, 4)
        assert (row["mfu"] is None) == (row["phase"] == "reward")
    phases = {r["phase"].split(" (")[0]: r for r in iteration}
    # guardrl's rollout runs exactly the bare rollout's forwards (the recipe's CFG, for Kontext the
    # conditioning images' tokens at the configured size): the same FLOPs, counted exactly
    (reference,) = [r for r in bare if r["phase"] == recipe_rollout]
    assert reference["as_recipe"] and phases["rollout"]["tflops"] == reference["tflops"] > 0
    assert phases["rollout"]["vs bare"].startswith("x") and phases["rollout"]["vs bare"].endswith(" time")
    if len(rollouts) == 2:  # CFG doubles the forward batch
        assert bare[1]["tflops"] == pytest.approx(2 * bare[0]["tflops"], rel=1e-12)
    assert phases["reward"]["tflops"] == 0 and phases["update"]["tflops"] > 0
    assert phases["whole iteration"]["tflops"] == pytest.approx(
        phases["rollout"]["tflops"] + phases["decode"]["tflops"] + phases["update"]["tflops"], rel=1e-12
    )
    assert phases["whole iteration"]["peak_gib"] > 0
