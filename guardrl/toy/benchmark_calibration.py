"""The toy benchmark's matched clip ranges: pilot runs without clipping record every sample's log-ratio; the
share flow_grpo's published clip range clips there is the target (`clipped_share`), and each variant gets the
clip range whose band leaves that share outside (`clip_for_share`); calibration.json keeps them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from guardrl.toy.benchmark_runs import VARIANTS, Budget, RunSpec, _run_many
from guardrl.toy.files import write_json_atomic

# Practically no clipping for the calibration pilots: toy log-ratios are of order 1e-3 and smaller.
NO_CLIP = 0.5


def clipped_share(log_ratios: np.ndarray, clip: float) -> float:
    """Share of samples outside the clip band [1 - c, 1 + c] (on the ratio, as the loss clips it)."""
    return float(np.mean((log_ratios > math.log1p(clip)) | (log_ratios < math.log1p(-clip))))


def clip_for_share(log_ratios: np.ndarray, share: float) -> float:
    """The clip range whose band leaves `share` of the samples outside (bisection on a log scale)."""
    low, high = 1e-12, 0.99
    if clipped_share(log_ratios, high) >= share:
        return high
    for _ in range(200):
        mid = math.sqrt(low * high)
        if clipped_share(log_ratios, mid) > share:
            low = mid
        else:
            high = mid
    return high


def calibrate(
    variants: Sequence[str],
    seeds: Sequence[int],
    budget: Budget,
    configs: str,
    out: str,
    jobs: int,
    num_elements: int,
    match_share: Optional[float] = None,
) -> dict[str, Any]:
    """Matched clip ranges per (variant, seed): pilots without clipping; the target share is `match_share`, or
    by default the share flow_grpo's published clip range clips in its pilot."""
    from guardrl.algorithm import effective_clip_range

    path = os.path.join(out, "calibration.json")
    if os.path.exists(path):
        with open(path) as f:
            calibration = json.load(f)
        if calibration.get("match_share") == match_share and all(
            f"{v}-s{s}" in calibration["clip_range"] for v in variants for s in seeds
        ):
            return calibration
    published = effective_clip_range(
        _config_clip(configs, "flow_grpo"), "per_sqrt_element", "mean", num_elements
    )
    needed = sorted(set(variants) | {"flow_grpo"}, key=VARIANTS.index)
    specs = [RunSpec(v, s, "pilot", NO_CLIP) for s in seeds for v in needed]
    pilots = {
        (r["variant"], r["seed"]): np.asarray(r["log_ratios"])
        for r in _run_many(specs, budget, configs, out, jobs, pilot=True)
    }
    calibration = {
        "target": {},
        "clip_range": {},
        "pilot_share": {},
        "flow_grpo_published_clip": published,
        "flow_grpo_published_share": {},
        "match_share": match_share,
    }
    for seed in seeds:
        published_share = clipped_share(pilots[("flow_grpo", seed)], published)
        calibration["flow_grpo_published_share"][str(seed)] = published_share
        target = published_share if match_share is None else match_share
        calibration["target"][str(seed)] = target
        for variant in variants:
            clip = clip_for_share(pilots[(variant, seed)], target)
            calibration["clip_range"][f"{variant}-s{seed}"] = clip
            calibration["pilot_share"][f"{variant}-s{seed}"] = clipped_share(pilots[(variant, seed)], clip)
    write_json_atomic(path, calibration)
    return calibration


def _config_clip(configs: str, variant: str) -> float:
    import yaml

    with open(os.path.join(configs, f"{variant}.yaml")) as f:
        grpo = yaml.safe_load(f)["model"]["grpo"]
    if grpo.get("clip_range_unit") != "per_sqrt_element":
        raise ValueError(f"{configs}/{variant}.yaml: the benchmark expects clip_range_unit per_sqrt_element")
    return float(grpo["clip_range"])
