"""The toy world: renderer, grammar, split, exact verifier, gold metrics (docs/toy_world.md quotes these)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.utilities.data import dim_zero_sum

from guardrl.data.prompts import iter_prompt_file
from guardrl.toy import gold, grammar, render, verify, world
from guardrl.toy.gold import (
    GOLD_DIRECTIONS,
    OffPaletteFraction,
    RealismDistance,
    VerifierPassRate,
    average_gold,
    degraded_sets,
    gold_metrics,
    normalized_gold,
)
from guardrl.toy.world import ObjectSpec, PromptSpec

RED_CIRCLE, BLUE_SQUARE = ObjectSpec("red", "circle"), ObjectSpec("blue", "square")
NUM_CLEAN = 2000


@pytest.fixture(scope="module")
def clean_set():
    """2000 renders at 32 x 32, the four kinds in turn, and the objects the verifier finds in them."""
    specs = grammar.sample_specs(NUM_CLEAN, seed=0)
    images = render.render_batch(specs, list(range(NUM_CLEAN)))
    return specs, images, verify.find_objects(images)


# --- world and renderer ---------------------------------------------------------------------------------


def test_shape_masks_fill_their_box_and_differ():
    for size in range(5, 25):
        masks = {shape: world.shape_mask(shape, size, size) for shape in world.SHAPES}
        for shape, mask in masks.items():
            # touching all four sides is what lets the verifier fit masks to a component's bounding box
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), (shape, size)
        for a, b in itertools.combinations(world.SHAPES, 2):
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou <= 0.89, (a, b, size, iou)
    nine = {shape: world.shape_mask(shape, 9, 9) for shape in world.SHAPES}
    assert [int(m.sum()) for m in nine.values()] == [69, 81, 49]
    assert nine["triangle"][0].sum() == 1 and nine["triangle"][-1].sum() == 9  # 1 px apex, full base


def test_geometry_per_image_size():
    assert world.geometry(32) == world.Geometry(32, 9, 12, 2, 1, 12)
    assert (world.geometry(16).min_object_size, world.geometry(16).max_object_size) == (5, 6)
    assert (world.geometry(64).min_object_size, world.geometry(64).max_object_size) == (18, 24)
    for bad in (15, 65, 32.0):
        with pytest.raises(ValueError, match="image_size"):
            world.geometry(bad)


def test_render_is_deterministic_and_seed_dependent():
    spec = grammar.parse_prompt("three green triangles")
    first = render.render(spec, seed=7)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert render.render(spec, seed=7).tobytes() == first.tobytes()
    assert render.render("three green triangles", seed=7).tobytes() == first.tobytes()
    others = {render.render(spec, seed=s).tobytes() for s in range(8, 58)}
    assert first.tobytes() not in others and len(others) == 50
    tensor = render.render_tensor(spec, seed=7)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert torch.equal(tensor, torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    global_state = np.random.get_state()[1].copy()
    render.render(spec, seed=7)
    assert np.array_equal(np.random.get_state()[1], global_state)  # the global RNG plays no part


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_layouts_respect_sizes_gaps_borders_and_relations(image_size):
    geo = world.geometry(image_size)
    palette = {tuple(c) for c in world.palette_rgb()}
    for i, spec in enumerate(grammar.sample_specs(200, seed=image_size)):
        layout = render.sample_layout(spec, np.random.default_rng(i), image_size)
        assert [p.obj for p in layout] == spec.instances()
        for p in layout:
            assert geo.min_object_size <= p.size <= geo.max_object_size
            assert geo.border <= min(p.x, p.y) and max(p.x, p.y) + p.size <= image_size - geo.border
        for a, b in itertools.combinations(layout, 2):
            assert a.is_apart_from(b, geo.gap)
        if spec.relation is not None:
            along, across = world.relation_offsets(spec.relation, layout[0].center2, layout[1].center2)
            assert along > 0 and along >= 2 * across
        image = render.draw(layout, image_size)
        assert {tuple(px) for px in image.reshape(-1, 3)} <= palette  # flat colors, no anti-aliasing


# --- grammar and split ------------------------------------------------------------------------------------


def test_vocabulary_sizes_and_round_trip():
    sizes = {kind: len(grammar.enumerate_prompts(kind)) for kind in world.KINDS}
    assert sizes == {"single_object": 21, "counting": 42, "two_object": 378, "position": 1512}
    prompts = grammar.enumerate_prompts()
    assert len(prompts) == len(set(prompts)) == 1953
    for spec in grammar.enumerate_specs():
        text = grammar.prompt_text(spec)
        assert grammar.parse_prompt(text) == spec
        assert grammar.prompt_text(grammar.parse_prompt(text)) == text
    assert grammar.parse_prompt("  Two  RED circles. ") == PromptSpec((RED_CIRCLE,), count=2)
    assert grammar.parse_prompt("a blue square below a red circle") == PromptSpec(
        (BLUE_SQUARE, RED_CIRCLE), relation="below"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a red circle and a red square",
        "four red circles",
        "a purple circle",
        "a red circle near a blue square",
        "",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="toy prompt"):
        grammar.parse_prompt(text)


def test_split_counts_and_disjointness():
    train, heldout = grammar.split_prompts("train"), grammar.split_prompts("heldout")
    assert (len(train), len(heldout)) == (1224, 729)
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(grammar.enumerate_prompts())
    assert grammar.split_counts() == {
        "single_object": {"train": 18, "pairing": 3, "combination": 0},
        "counting": {"train": 36, "pairing": 6, "combination": 0},
        "two_object": {"train": 234, "pairing": 102, "combination": 42},
        "position": {"train": 936, "pairing": 408, "combination": 168},
    }
    train_specs = [grammar.parse_prompt(p) for p in train]
    train_objects = {obj for spec in train_specs for obj in spec.objects}
    assert train_objects.isdisjoint(grammar.HELDOUT_PAIRINGS)
    assert {o.color for o in train_objects} == set(world.COLORS) and {o.shape for o in train_objects} == set(
        world.SHAPES
    )
    # a held-out combination never appears together in training, in either order or with any relation
    train_pairs = {frozenset(spec.objects) for spec in train_specs if len(spec.objects) == 2}
    for text in heldout:
        spec = grammar.parse_prompt(text)
        if grammar.heldout_reason(spec) == "combination":
            assert frozenset(spec.objects) not in train_pairs


def test_prompt_files_stream_through_guardrl(tmp_path):
    paths = grammar.write_split_files(str(tmp_path / "toy"))
    for split, path in paths.items():
        assert list(iter_prompt_file(path)) == grammar.split_prompts(split)
    with pytest.raises(ValueError, match=r"\.txt"):
        grammar.write_prompt_file(str(tmp_path / "p.json"), ["a red circle"])


# --- verifier ----------------------------------------------------------------------------------------------


def test_shape_classification_tolerates_rough_edges_but_not_blobs():
    square = world.shape_mask("square", 11, 11).copy()
    square[0, 0] = square[0, -1] = square[-1, 0] = square[-1, -1] = False  # corners clipped by 1 px
    assert verify.classify_shape(square)[0] == "square"
    blunt = world.shape_mask("triangle", 11, 11).copy()
    blunt[0, 4:7] = blunt[1, 3:8] = True  # 3 px apex
    assert verify.classify_shape(blunt)[0] == "triangle"
    disc, full = world.shape_mask("circle", 11, 11), world.shape_mask("square", 11, 11)
    blob = disc.copy()
    blob[tuple(np.argwhere(full & ~disc)[::2].T)] = True  # half-way between a disc and a square
    assert verify.classify_shape(blob) == (None, pytest.approx(0.9008, abs=1e-4))
    assert verify.classify_shape(world.shape_mask("circle", 9, 14))[0] is None  # an ellipse is not a circle
    assert verify.classify_shape(world.shape_mask("circle", 11, 12))[0] == "circle"


def test_spec_validation_and_blank_images():
    with pytest.raises(ValueError, match="different colors"):
        PromptSpec((RED_CIRCLE, ObjectSpec("red", "square")))
    with pytest.raises(ValueError, match="count"):
        PromptSpec((RED_CIRCLE,), count=4)
    with pytest.raises(ValueError, match="two objects"):
        PromptSpec((RED_CIRCLE,), relation="above")
    with pytest.raises(ValueError, match="palette"):
        ObjectSpec("purple", "circle")
    blank = verify.verify(torch.zeros(3, 32, 32), "a red circle")
    assert (blank.colors, blank.counts, blank.shapes, blank.objects) == (False, False, False, ())


def test_verifier_passes_every_clean_render(clean_set):
    specs, images, found = clean_set
    assert {spec.kind for spec in specs} == set(world.KINDS)
    verdicts = [verify.judge(objects, spec) for objects, spec in zip(found, specs)]
    assert sum(v.passed for v in verdicts) == NUM_CLEAN
    assert all(o.shape_iou == 1.0 for objects in found for o in objects)
    assert verify.pass_rate(images, specs, quantized=True) == 1.0
    assert torch.equal(verify.quantize(images), images)  # renders are on the palette already


@pytest.mark.parametrize("image_size", [16, 64])
def test_verifier_passes_clean_renders_at_other_sizes(image_size):
    specs = grammar.sample_specs(200, seed=1)
    images = render.render_batch(specs, list(range(200)), image_size)
    assert verify.pass_rate(images, specs) == 1.0


def test_verifier_rejects_mismatched_prompts(clean_set):
    specs, _, found = clean_set
    every_spec = grammar.enumerate_specs()
    rng = np.random.default_rng(1)
    accepted = 0
    for objects, spec in zip(found, specs):
        other = every_spec[int(rng.integers(len(every_spec)))]
        while sorted(map(repr, other.instances())) == sorted(map(repr, spec.instances())):  # same scene
            other = every_spec[int(rng.integers(len(every_spec)))]
        accepted += verify.judge(objects, other).passed
    assert accepted == 0  # of 2000
    near = [
        verify.judge(objects, edit).passed
        for objects, spec in zip(found, specs)
        for edit in grammar.near_misses(spec)
    ]
    assert len(near) > 20000 and sum(near) == 0


def test_verdicts_name_the_failed_check():
    spec = PromptSpec((RED_CIRCLE, BLUE_SQUARE), relation="left of")
    image = render.render(spec, seed=3)
    assert verify.verify(image, spec).passed
    wrong_shape = verify.verify(
        image, PromptSpec((RED_CIRCLE, ObjectSpec("blue", "triangle")), relation="left of")
    )
    assert (wrong_shape.colors, wrong_shape.counts, wrong_shape.shapes, wrong_shape.position) == (
        True,
        True,
        False,
        True,
    )
    wrong_relation = verify.verify(image, PromptSpec((RED_CIRCLE, BLUE_SQUARE), relation="above"))
    assert (wrong_relation.colors, wrong_relation.shapes, wrong_relation.position) == (True, True, False)
    converse = verify.verify(image, PromptSpec((BLUE_SQUARE, RED_CIRCLE), relation="right of"))
    assert converse.passed  # the same statement, reworded
    assert verify.verify(image, PromptSpec((RED_CIRCLE, BLUE_SQUARE))).position is None
    extra = verify.verify(image, PromptSpec((RED_CIRCLE,)))
    assert (extra.colors, extra.counts, extra.shapes) == (False, True, True)
    twos = verify.verify(render.render("two red circles", seed=3), "three red circles")
    assert (twos.colors, twos.counts, twos.shapes) == (True, False, True)


def test_verifier_tolerates_small_noise_but_not_heavy_noise(clean_set):
    specs, images, _ = clean_set
    specs, images = specs[:1000], images[:1000]
    generator = torch.Generator().manual_seed(0)
    small = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert verify.pass_rate(small, specs) == 1.0
    heavy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert verify.pass_rate(heavy, specs) <= 0.01  # measured 0.000 on these 1000
    assert (
        verify.pass_rate(heavy, specs, quantized=True) <= 0.6
    )  # measured 0.469: quantizing undoes some noise


def test_verifier_ignores_speckle_but_not_an_extra_object(clean_set):
    specs, images, _ = clean_set
    num_blocks = 0
    for spec, image in zip(specs[:100], images[:100]):
        unused = next(c for c in world.COLORS if c not in {o.color for o in spec.objects})
        color = torch.tensor(world.PALETTE[unused], dtype=torch.float32).view(3, 1, 1) / 255
        occupied = image.amax(0, keepdim=True)[None]  # 1, 1, H, W
        # isolated pixels on a 3 px grid: each is a 1 px component of a color the prompt does not name
        free = F.max_pool2d(occupied, 3, stride=1, padding=1)[0, 0] == 0
        grid = torch.zeros_like(free)
        grid[::3, ::3] = True
        speckled = torch.where(free & grid, color, image)
        assert (speckled != image).any() and verify.verify(speckled, spec).passed
        # a 4 x 4 block of that color (16 px >= min_component_area 12) is an extra object
        room = F.max_pool2d(occupied, 6, stride=1)[0, 0] == 0  # 6 x 6 windows of background
        if room.any():
            y, x = (int(i) + 1 for i in torch.nonzero(room)[0])
            blocked = image.clone()
            blocked[:, y : y + 4, x : x + 4] = color
            verdict = verify.verify(blocked, spec)
            assert not verdict.colors and not verdict.passed
            num_blocks += 1
    assert num_blocks == 100  # every one of these renders has a free 6 x 6 window


def test_quantized_verification_forgives_color_drift():
    specs = grammar.sample_specs(200, seed=2)
    images = render.render_batch(specs, list(range(200)))
    drifted = images * 0.5 + 0.2  # objects 0.41-0.52 from their palette color, background 0.35 from black
    assert verify.pass_rate(drifted, specs) == 0.0
    assert verify.pass_rate(drifted, specs, quantized=True) == 1.0


# --- gold metrics ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gold_sets():
    specs = grammar.sample_specs(512, seed=3)
    real = render.render_batch(specs, list(range(512)))
    other = render.render_batch(specs, list(range(10_000, 10_512)))
    return specs, real, {"real": other, **degraded_sets(other)}


def test_gold_metrics_of_real_and_degraded_renders(gold_sets):
    specs, real, sets = gold_sets
    metrics = {name: gold_metrics(images, specs, real) for name, images in sets.items()}
    realism = {name: m["realism_distance"] for name, m in metrics.items()}
    off_palette = {name: m["off_palette_fraction"] for name, m in metrics.items()}
    # two independent sets of real renders: ~0 (measured 0.03); benign drift stays below 1; damage is far
    assert realism["real"] < 0.1
    assert realism["tint_0.02"] < 1.0 and realism["noise_0.03"] < 1.0
    assert realism["noise_0.1"] > 3.0 and realism["color_shift_0.15"] > 10.0 and realism["blur_3x3"] > 100.0
    assert off_palette["real"] == off_palette["tint_0.02"] == off_palette["noise_0.03"] == 0.0
    assert off_palette["noise_0.1"] > 0.02 and off_palette["blur_3x3"] > 0.1
    assert metrics["real"]["pass_rate"] == metrics["noise_0.1"]["pass_rate"] == 1.0
    assert (
        metrics["color_shift_0.15"]["pass_rate"] == 1.0
    )  # the verifier judges content; realism sees the shift
    assert metrics["blur_3x3"]["pass_rate"] < 0.9


def test_metrics_aggregate_like_a_single_pass(gold_sets):
    specs, real, sets = gold_sets
    generated = sets["noise_0.1"]
    half = len(specs) // 2

    def build():
        return [
            VerifierPassRate(),
            VerifierPassRate(quantized=True),
            OffPaletteFraction(),
            RealismDistance(32),
        ]

    def feed(metrics, lo, hi):
        for metric in metrics[:2]:
            metric.update(generated[lo:hi], specs[lo:hi])
        metrics[2].update(generated[lo:hi])
        metrics[3].update(generated[lo:hi])
        metrics[3].update(real[lo:hi], real=True)

    single, halves, rank0, rank1 = build(), build(), build(), build()
    feed(single, 0, len(specs))
    feed(halves, 0, half)
    feed(halves, half, len(specs))
    feed(rank0, 0, half)
    feed(rank1, half, len(specs))
    for one, two, r0, r1 in zip(single, halves, rank0, rank1):
        assert r0._reductions and all(fx is dim_zero_sum for fx in r0._reductions.values())  # sums only
        r0.merge_state(r1)  # what a distributed sync does with dist_reduce_fx="sum"
        expected = float(one.compute())
        # exact for the counts; the realism distance takes square roots of near-zero eigenvalues, which turn
        # float rounding (1e-16) into about 1e-9 relative
        assert float(two.compute()) == pytest.approx(expected, rel=1e-7, abs=1e-12)
        assert float(r0.compute()) == pytest.approx(expected, rel=1e-7, abs=1e-12)


def test_average_gold_is_one_on_the_reference_and_respects_directions():
    reference = {
        "pass_rate": 0.6,
        "pass_rate_quantized": 0.7,
        "off_palette_fraction": 0.01,
        "realism_distance": 5.0,
    }
    assert average_gold(reference, reference) == pytest.approx(1.0, abs=1e-12)
    worse = {
        "pass_rate": 0.3,
        "pass_rate_quantized": 0.7,
        "off_palette_fraction": 0.021,
        "realism_distance": 11.0,
    }
    normalized = normalized_gold(worse, reference)
    assert normalized == pytest.approx(
        {"pass_rate": 0.5, "pass_rate_quantized": 1.0, "off_palette_fraction": 0.5, "realism_distance": 0.5}
    )
    assert average_gold(worse, reference) == pytest.approx(0.625)
    better = {"off_palette_fraction": 0.0, "realism_distance": 0.0}
    assert normalized_gold(better, reference) == pytest.approx(
        {"off_palette_fraction": 11.0, "realism_distance": 6.0}
    )
    assert set(GOLD_DIRECTIONS) == set(reference)
    with pytest.raises(ValueError, match="no direction"):
        average_gold({"proxy": 1.0}, {"proxy": 1.0})
    with pytest.raises(ValueError, match="no reference"):
        average_gold({"pass_rate": 1.0}, {})


def test_check_commands_print_their_rates(capsys):
    verify.main(["--check", "40"])
    gold.main(["--check", "64"])
    out = capsys.readouterr().out
    assert "clean/strict                 1.0000" in out and "mismatch/random              0.0000" in out
    assert out.count("\n") >= 15 and "real (other seeds)      1.0000  1.0000   0.0000" in out
