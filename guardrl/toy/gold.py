"""Gold metrics of the toy world: not a learned proxy, and barely moved by benign drift.

pass_rate             verifier pass rate (higher is better)
pass_rate_quantized   the same on palette-quantized images: judges the layout, forgives color drift
off_palette_fraction  share of pixels farther than OFF_PALETTE_DISTANCE from every palette color and from the
                      background (lower is better). 0.25 is a quarter of the smallest distance between two
                      palette colors: a visibly different color. A faint tint or noise of std 0.03 never gets
                      there; smears, halos and mixed colors do.
realism_distance      Frechet distance between Gaussian fits of hand-defined image features (FEATURE_NAMES) of
                      generated images and of real renders of the same prompts (lower is better), in units of
                      fixed per-feature scales (`feature_scales`: the spread over a seeded set of renders,
                      floored by FEATURE_RESOLUTION). Nothing is learned or downloaded; two independent
                      sets of real renders score about 0.

Each is a torchmetrics `Metric` whose states are sums (counts, feature sums and sums of outer products), so
`update` on any split of the data and any number of ranks computes the same value. `average_gold` normalizes
the metrics so that a reference (the shipped model) scores 1.00, as GRPO-Guard's main table does.

`python -m guardrl.toy.gold --check 512` prints the metrics of real, noised, blurred and tinted renders.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from functools import cache

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from guardrl.toy.grammar import sample_specs
from guardrl.toy.render import render_batch
from guardrl.toy.verify import (
    COLOR_TOLERANCE,
    UNKNOWN,
    as_image_batch,
    component_table,
    nearest_palette,
    verify_batch,
)
from guardrl.toy.world import COLORS, PromptSpec, geometry

OFF_PALETTE_DISTANCE = 0.25

FEATURE_NAMES: tuple[str, ...] = (
    "fraction/background",
    *(f"fraction/{color}" for color in COLORS),
    "fraction/unknown",  # farther than COLOR_TOLERANCE from the palette (the verifier's rule 1)
    "palette_distance",  # mean distance of a pixel to its nearest palette color: noise, tint, blur
    "num_objects",  # components of at least min_component_area pixels
    "num_speckles",  # smaller components
    "object_fill",  # mean area / bounding-box area over objects: the shape mix and how well shapes are formed
    "object_squareness",  # mean min(w, h) / max(w, h) over objects: 1 for every render
    "object_size",  # mean sqrt(area) / image size over objects
    "laplacian_energy",  # mean squared 4-neighbour Laplacian: sharp edges up, blur down, noise up
)
# The smallest difference that counts as one unit of each feature, also the floor of its scale: without it a
# feature that is constant on renders (palette_distance, squareness, speckles) would make any drift infinitely
# far. Chosen at about the edge of visibility, so that benign drift stays below 1 (docs/toy_world.md).
FEATURE_RESOLUTIONS = {
    "fraction": 0.005,  # 5 px of a 32 x 32 image
    "palette_distance": 0.05,  # a 13/255 shift of every pixel; a 0.02 tint moves it by 0.7 units
    "num_objects": 0.25,
    "num_speckles": 0.5,
    "object_fill": 0.02,  # one or two pixels of a 9 px square
    "object_squareness": 0.05,  # a 9 px box one pixel taller than wide is 0.1 away
    "object_size": 0.01,
    "laplacian_energy": 0.01,
}
FEATURE_RESOLUTION = torch.tensor(
    [FEATURE_RESOLUTIONS[name.split("/")[0]] for name in FEATURE_NAMES], dtype=torch.float64
)
SCALE_REFERENCE_SIZE = 1024
SCALE_REFERENCE_SEED = 12345


def realism_features(images: torch.Tensor) -> torch.Tensor:
    """(N, len(FEATURE_NAMES)) float64 features of images (N, 3, H, W) in [0, 1]."""
    batch = as_image_batch(images).cpu()
    N, _, H, _ = batch.shape
    index_NHW, distance_NHW = nearest_palette(batch)
    classes_NHW = torch.where(distance_NHW <= COLOR_TOLERANCE, index_NHW, UNKNOWN)
    # columns: unknown, background, COLORS (classes shifted by one so that UNKNOWN = -1 becomes column 0)
    class_fractions = F.one_hot(classes_NHW.view(N, -1) + 1, 2 + len(COLORS)).double().mean(1)
    table = component_table(classes_NHW)
    is_object = table.area >= geometry(int(H)).min_component_area
    num_objects = torch.zeros(N, dtype=torch.float64).index_add_(0, table.image_index, is_object.double())
    num_speckles = torch.zeros(N, dtype=torch.float64).index_add_(0, table.image_index, (~is_object).double())
    width, height = (table.x1 - table.x0 + 1).double(), (table.y1 - table.y0 + 1).double()
    per_object = torch.stack(
        [
            table.area / (width * height),
            torch.minimum(width, height) / torch.maximum(width, height),
            table.area.double().sqrt() / H,
        ],
        dim=1,
    )[is_object]
    object_means = torch.zeros(N, 3, dtype=torch.float64).index_add_(
        0, table.image_index[is_object], per_object
    )
    object_means /= num_objects.clamp(min=1).unsqueeze(1)
    padded = F.pad(batch, (1, 1, 1, 1), mode="replicate")
    laplacian = (
        padded[..., :-2, 1:-1]
        + padded[..., 2:, 1:-1]
        + padded[..., 1:-1, :-2]
        + padded[..., 1:-1, 2:]
        - 4 * batch
    )
    return torch.cat(
        [
            class_fractions[:, 1:],
            class_fractions[:, :1],
            distance_NHW.view(N, -1).double().mean(1, keepdim=True),
            num_objects.unsqueeze(1),
            num_speckles.unsqueeze(1),
            object_means,
            laplacian.double().square().mean((1, 2, 3)).unsqueeze(1),
        ],
        dim=1,
    )


@cache
def feature_scales(image_size: int) -> torch.Tensor:
    """Fixed per-feature scales at one image size: the standard deviation over SCALE_REFERENCE_SIZE seeded
    renders of a kind-balanced prompt sample, floored by FEATURE_RESOLUTION. Computed once (about a second).
    """
    specs = sample_specs(SCALE_REFERENCE_SIZE, SCALE_REFERENCE_SEED)
    seeds = [SCALE_REFERENCE_SEED * 7919 + i for i in range(SCALE_REFERENCE_SIZE)]
    features = realism_features(render_batch(specs, seeds, image_size))
    return torch.maximum(features.std(0), FEATURE_RESOLUTION)


def frechet_distance(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), symmetric square roots (eigh), float64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(distance.clamp(min=0))


class VerifierPassRate(Metric):
    """Share of images that pass the exact verifier against their prompt (optionally after quantization)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, quantized: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quantized = quantized
        self.add_state("num_passed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[str | PromptSpec]) -> None:
        verdicts = verify_batch(images, prompts, self.quantized)
        self.num_passed += sum(v.passed for v in verdicts)
        self.num_images += len(verdicts)

    def compute(self) -> torch.Tensor:
        return self.num_passed.double() / self.num_images


class OffPaletteFraction(Metric):
    """Share of pixels farther than `distance` from every palette color and from the background."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, distance: float = OFF_PALETTE_DISTANCE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.distance = distance
        self.add_state("num_off", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_pixels", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[str | PromptSpec] = ()) -> None:
        """`prompts` is not read: it is accepted so that this metric fits OverOptimizationWatch's `gold` list,
        which calls every gold metric with (images, prompts)."""
        _, distance_NHW = nearest_palette(as_image_batch(images))
        # written as "not within" so that NaN pixels count as off-palette
        self.num_off += int((~(distance_NHW <= self.distance)).sum())
        self.num_pixels += distance_NHW.numel()

    def compute(self) -> torch.Tensor:
        return self.num_off.double() / self.num_pixels


class RealismDistance(Metric):
    """Frechet distance of `realism_features` between generated images and real renders (`real=True`), in
    units of `feature_scales(image_size)`. Give both sets the same prompts; at least two images each."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, image_size: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.image_size = geometry(image_size).image_size
        num_features = len(FEATURE_NAMES)
        for prefix in ("real", "generated"):
            self.add_state(
                f"{prefix}_count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(
                f"{prefix}_sum", default=torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(
                f"{prefix}_outer_sum",
                default=torch.zeros(num_features, num_features, dtype=torch.float64),
                dist_reduce_fx="sum",
            )

    def update(self, images: torch.Tensor, real: bool = False) -> None:
        batch = as_image_batch(images)
        if batch.shape[-1] != self.image_size or batch.shape[-2] != self.image_size:
            raise ValueError(
                f"RealismDistance(image_size={self.image_size}) got images of {tuple(batch.shape)}"
            )
        if not torch.isfinite(batch).all():
            raise ValueError("RealismDistance got non-finite pixels (NaN or inf): the generator diverged")
        features = scaled_realism_features(batch).to(self.real_sum.device)
        prefix = "real" if real else "generated"
        setattr(self, f"{prefix}_count", getattr(self, f"{prefix}_count") + features.shape[0])
        setattr(self, f"{prefix}_sum", getattr(self, f"{prefix}_sum") + features.sum(0))
        setattr(self, f"{prefix}_outer_sum", getattr(self, f"{prefix}_outer_sum") + features.T @ features)

    def compute(self) -> torch.Tensor:
        moments = []
        for prefix in ("real", "generated"):
            count = getattr(self, f"{prefix}_count")
            if count < 2:
                raise ValueError(f"RealismDistance needs at least 2 {prefix} images, got {int(count)}")
            moments += feature_moments(
                count, getattr(self, f"{prefix}_sum"), getattr(self, f"{prefix}_outer_sum")
            )
        return torch.tensor(frechet_distance(*moments), dtype=torch.float64)


def feature_moments(count, total: torch.Tensor, outer_sum: torch.Tensor) -> list[torch.Tensor]:
    """[mean, covariance (n - 1)] from a feature set's count, sum and sum of outer products."""
    mean = total / count
    return [mean, (outer_sum - count * torch.outer(mean, mean)) / (count - 1)]


def scaled_realism_features(images: torch.Tensor) -> torch.Tensor:
    """`realism_features` in units of `feature_scales`: what RealismDistance accumulates."""
    batch = as_image_batch(images)
    return realism_features(batch) / feature_scales(int(batch.shape[-1]))


# Direction of each gold metric, and for lower-is-better ones a floor (the metric's resolution: about what
# real renders score) so that a perfect value normalizes to a finite number instead of dividing by zero.
GOLD_DIRECTIONS: dict[str, tuple[str, float]] = {
    "pass_rate": ("higher", 0.0),
    "pass_rate_quantized": ("higher", 0.0),
    "off_palette_fraction": ("lower", 1e-3),
    "realism_distance": ("lower", 1.0),
}


def normalized_gold(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    directions: Mapping[str, tuple[str, float]] = GOLD_DIRECTIONS,
) -> dict[str, float]:
    """Each metric relative to the reference, oriented so that 1.0 is the reference and more is better:
    higher-is-better  value / reference;   lower-is-better  (reference + floor) / (value + floor)."""
    normalized = {}
    for name, value in metrics.items():
        if name not in directions:
            raise ValueError(f"gold metric {name!r} has no direction; known: {sorted(directions)}")
        if name not in reference:
            raise ValueError(f"gold metric {name!r} has no reference value")
        direction, floor = directions[name]
        value, ref = float(value), float(reference[name])
        if direction == "higher":
            if ref <= 0:
                raise ValueError(f"reference {name}={ref} must be > 0 to normalize a higher-is-better metric")
            normalized[name] = value / ref
        elif direction == "lower":
            normalized[name] = (ref + floor) / (value + floor)
        else:
            raise ValueError(f"direction of {name!r} must be 'higher' or 'lower', got {direction!r}")
    return normalized


def average_gold(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    directions: Mapping[str, tuple[str, float]] = GOLD_DIRECTIONS,
) -> float:
    """Average(gold): the mean of `normalized_gold`; the reference itself scores exactly 1.00."""
    normalized = normalized_gold(metrics, reference, directions)
    if not normalized:
        raise ValueError("average_gold needs at least one metric")
    return sum(normalized.values()) / len(normalized)


def gold_metrics(
    images: torch.Tensor, prompts: Sequence[str | PromptSpec], real_images: torch.Tensor
) -> dict[str, float]:
    """All four gold metrics of one set of images (real_images: renders of the same prompts)."""
    image_size = as_image_batch(images).shape[-1]
    metrics = {
        "pass_rate": VerifierPassRate(),
        "pass_rate_quantized": VerifierPassRate(quantized=True),
        "off_palette_fraction": OffPaletteFraction(),
        "realism_distance": RealismDistance(image_size),
    }
    metrics["pass_rate"].update(images, prompts)
    metrics["pass_rate_quantized"].update(images, prompts)
    metrics["off_palette_fraction"].update(images)
    metrics["realism_distance"].update(images)
    metrics["realism_distance"].update(real_images, real=True)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


# The verifier's checks one by one (`Verdict` fields): rates that start well above 0 on the shipped model and
# can fall as well as rise, unlike the strict pass rate (2% on held-out prompts), which needs all of them at
# once.
CHECKS = ("colors", "counts", "shapes", "position")


def gold_metrics_with_errors(
    images: torch.Tensor,
    prompts: Sequence[str | PromptSpec],
    real_images: torch.Tensor,
    bootstrap: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """`gold_metrics`' four values (computed here once each; tests/test_toy_gold_metrics.py checks they are
    equal) plus each verifier check's pass rate (`check_<name>`; position over position prompts only) and a
    standard error for every value (`<name>_se`): binomial sqrt(p (1 - p) / n) for rates, the
    per-image spread / sqrt(n) for the off-palette fraction, and for the realism distance the standard
    deviation over `bootstrap` resamples of the generated images (the real renders fixed), seeded by
    `seed`."""
    images = as_image_batch(images)
    # Each expensive step once: one verification per mode, one palette distance, one feature extraction per
    # set; the bootstrap resamples feature rows (an image's features do not depend on the others).
    values: dict[str, float] = {}
    verdicts = verify_batch(images, prompts)
    quantized = verify_batch(images, prompts, quantized=True)

    def rate(name: str, hits: list[bool]) -> None:
        n = len(hits)
        p = sum(hits) / n if n else float("nan")
        values[name] = p
        values[f"{name}_se"] = (p * (1 - p) / n) ** 0.5 if n else float("nan")

    rate("pass_rate", [v.passed for v in verdicts])
    rate("pass_rate_quantized", [v.passed for v in quantized])
    for check in CHECKS:
        rate(f"check_{check}", [getattr(v, check) for v in verdicts if getattr(v, check) is not None])
    _, distance_NHW = nearest_palette(images)
    off_NHW = ~(distance_NHW <= OFF_PALETTE_DISTANCE)  # OffPaletteFraction's rule: NaN pixels count as off
    values["off_palette_fraction"] = float(off_NHW.sum().double() / off_NHW.numel())
    off_per_image = off_NHW.double().flatten(1).mean(1)
    values["off_palette_fraction_se"] = float(off_per_image.std() / len(off_per_image) ** 0.5)
    generated, real = scaled_realism_features(images), scaled_realism_features(real_images)
    real_moments = feature_moments(len(real), real.sum(0), real.T @ real)
    values["realism_distance"] = frechet_distance(
        *real_moments, *feature_moments(len(generated), generated.sum(0), generated.T @ generated)
    )
    generator = torch.Generator().manual_seed(seed)
    resampled = []
    for _ in range(bootstrap):
        rows = generated[torch.randint(len(generated), (len(generated),), generator=generator)]
        resampled.append(
            frechet_distance(*real_moments, *feature_moments(len(rows), rows.sum(0), rows.T @ rows))
        )
    values["realism_distance_se"] = float(torch.tensor(resampled).std()) if bootstrap > 1 else float("nan")
    return values


def box_blur(images: torch.Tensor) -> torch.Tensor:
    """3 x 3 box blur (replicate padding): a stand-in for a generator's soft edges."""
    padded = F.pad(as_image_batch(images), (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(padded, 3, stride=1)


def degraded_sets(images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The corruptions the docs and tests report, each clamped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)

    def noise(std: float) -> torch.Tensor:
        return (images + std * torch.randn(images.shape, generator=generator)).clamp(0, 1)

    shift = torch.tensor([-0.15, 0.1, 0.15]).view(1, 3, 1, 1)  # e.g. red -> (0.85, 0.1, 0.15)
    return {
        "noise_0.03": noise(0.03),
        "noise_0.1": noise(0.1),
        "tint_0.02": (images + 0.02).clamp(0, 1),
        "color_shift_0.15": (images + shift).clamp(0, 1),
        "blur_3x3": box_blur(images),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Gold metrics of real, noised, blurred and color-shifted renders."
    )
    parser.add_argument("--check", type=int, default=512, metavar="N", help="number of images per set")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    specs = sample_specs(args.check, args.seed)
    real = render_batch(specs, [args.seed * 1_000_003 + i for i in range(args.check)], args.image_size)
    other = render_batch(
        specs, [args.seed * 1_000_003 + 500_000 + i for i in range(args.check)], args.image_size
    )
    sets = {"real (other seeds)": other, **degraded_sets(other, args.seed)}
    print(f"{'set':22s} {'pass':>7s} {'pass_q':>7s} {'off_pal':>8s} {'realism':>9s}")
    for name, images in sets.items():
        m = gold_metrics(images, specs, real)
        print(
            f"{name:22s} {m['pass_rate']:7.4f} {m['pass_rate_quantized']:7.4f} "
            f"{m['off_palette_fraction']:8.4f} {m['realism_distance']:9.3f}"
        )


if __name__ == "__main__":
    main()
