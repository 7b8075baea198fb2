"""The toy benchmark: clip calibration arithmetic, and the quick mode end to end (all six runs, both clip
modes) with well-formed, finite outputs."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from guardrl.toy.benchmark import run_benchmark
from guardrl.toy.benchmark_calibration import clip_for_share, clipped_share
from guardrl.toy.benchmark_report import report_iterations
from guardrl.toy.benchmark_runs import CLIP_MODES, QUICK, VARIANTS
from tests.conftest import REPO_ROOT

CONFIGS = os.path.join(REPO_ROOT, "configs", "toy")


def test_clipped_share_and_clip_for_share_by_hand():
    log_ratios = np.log([0.5, 0.8, 0.97, 1.0, 1.02, 1.2, 1.6, 2.0])
    # c = 0.05: the band is [0.95, 1.05]; outside are 0.5, 0.8, 1.2, 1.6, 2.0.
    assert clipped_share(log_ratios, 0.05) == 5 / 8
    # c in [0.2, 0.5) leaves 0.5, 1.6 and 2.0 outside; below 0.2, 0.8 and 1.2 join them.
    c = clip_for_share(log_ratios, 3 / 8)
    assert abs(c - 0.2) < 1e-6 and clipped_share(log_ratios, c) == 3 / 8
    assert clip_for_share(log_ratios, 1.0) == pytest.approx(1e-12, rel=1e-6)  # everything may be clipped
    assert clip_for_share(log_ratios, 0.0) > 0.9  # nothing outside: the widest band allowed


def test_report_iterations_pick_start_quarter_half_end():
    assert report_iterations(range(0, 201, 10)) == [0, 50, 100, 200]
    assert report_iterations([0, 1, 2]) == [0, 1, 2]


def test_bad_benchmark_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--variants=flow_grpo,ppo.*ppo.*not allowed"):
        run_benchmark(str(tmp_path), variants=["flow_grpo", "ppo"], configs=CONFIGS)
    with pytest.raises(ValueError, match="--clip-modes=tight"):
        run_benchmark(str(tmp_path), clip_modes=["tight"], configs=CONFIGS)
    with pytest.raises(ValueError, match=r"--match-share=1.5 must be in \[0, 1\)"):
        run_benchmark(str(tmp_path), match_share=1.5, configs=CONFIGS)
    with pytest.raises(FileNotFoundError, match="--configs"):
        run_benchmark(str(tmp_path), configs=str(tmp_path))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_quick_benchmark_writes_finite_well_formed_results(tmp_path):
    out = str(tmp_path / "bench")
    report = run_benchmark(out, VARIANTS, seeds=[0], clip_modes=CLIP_MODES, budget=QUICK, configs=CONFIGS)

    results = _rows(os.path.join(out, "results.csv"))
    # 6 variants x 2 clip modes x evaluations at iterations 0, 1, 2 x 2 splits x 2 samplers
    assert len(results) == 6 * 2 * 3 * 2 * 2
    numeric = [
        "proxy",
        "pass_rate",
        "pass_rate_quantized",
        "off_palette_fraction",
        "realism_distance",
        "average_gold",
        "clip_range_used",
    ]
    for row in results:
        assert all(math.isfinite(float(row[k])) for k in numeric), row
        assert 0 <= float(row["pass_rate"]) <= 1 and 0 <= float(row["off_palette_fraction"]) <= 1
    # Iteration 0 is the shipped model for every run: identical numbers, Average(gold) exactly 1.
    start = [r for r in results if r["iteration"] == "0"]
    assert {float(r["average_gold"]) for r in start} == {1.0}
    for key in ("proxy", "pass_rate", "realism_distance"):
        for split in ("heldout", "train"):
            for sampler in ("ode", "sde"):
                values = {r[key] for r in start if r["split"] == split and r["sampler"] == sampler}
                assert len(values) == 1, (key, split, sampler, values)
    # Training moved the policy: some later evaluation differs from the start.
    later = [r for r in results if r["iteration"] == "2"]
    assert any(
        float(r["proxy"]) != float(start[0]["proxy"])
        for r in later
        if r["split"] == start[0]["split"] and r["sampler"] == start[0]["sampler"]
    )

    ratios = _rows(os.path.join(out, "ratios.csv"))
    # 12 runs x 2 iterations x 3 trained steps (sde_window [0, 3])
    assert len(ratios) == 12 * 2 * 3
    for row in ratios:
        assert math.isfinite(float(row["log_ratio_mean"])) and math.isfinite(float(row["raw_log_ratio_std"]))
        assert 0 <= float(row["clip_frac"]) <= 1

    calibration = json.load(open(os.path.join(out, "calibration.json")))
    target = calibration["target"]["0"]
    assert 0 <= target <= 1
    for variant in VARIANTS:
        # The pilot log-ratios are few: the matched c reaches the target share up to one sample's granularity.
        assert calibration["pilot_share"][f"{variant}-s0"] <= target + 1e-12
    matched = {r["variant"]: float(r["clip_range_used"]) for r in results if r["clip_mode"] == "matched"}
    assert matched == {v: pytest.approx(calibration["clip_range"][f"{v}-s0"]) for v in VARIANTS}
    published = {r["variant"]: float(r["clip_range_used"]) for r in results if r["clip_mode"] == "published"}
    # Published: FlowGRPO's 1e-4 x 256 / sqrt(3072) and GRPO-Guard's 2e-6 x 256 / sqrt(3072).
    assert published["flow_grpo"] == pytest.approx(1e-4 * 256 / math.sqrt(3072))
    assert published["grpo_guard"] == pytest.approx(2e-6 * 256 / math.sqrt(3072))
    assert published["null_control"] == published["flow_grpo"]

    table = open(os.path.join(out, "table.md")).read()
    for mode in CLIP_MODES:
        assert f"## clip {mode}: heldout prompts, ODE sampling" in table
    for variant in VARIANTS:
        assert table.count(f"| {variant} | 2 |") == 2 * 4  # final iteration, 2 modes x 4 (split, sampler)
    for name in ("proxy_gold.png", "log_ratio_by_step.png", "clip_fractions.png"):
        with Image.open(os.path.join(out, name)) as image:
            assert image.size[0] > 500 and image.size[1] > 300
    assert report["plots"] and os.path.isfile(report["table"])

    # Repeating the command skips finished runs and rewrites the same results.
    again = run_benchmark(out, VARIANTS, seeds=[0], clip_modes=CLIP_MODES, budget=QUICK, configs=CONFIGS)
    assert _rows(os.path.join(out, "results.csv")) == results
    assert again["wall_s"] < report["wall_s"]


def test_recorder_on_resume_drops_rows_past_the_checkpoint_and_redoes_a_missing_evaluation(tmp_path):
    from types import SimpleNamespace

    from guardrl.toy.benchmark_csv import _append_csv
    from guardrl.toy.benchmark_recorder import EVAL_COLUMNS, RATIO_COLUMNS, BenchmarkRecorder

    recorder = BenchmarkRecorder(str(tmp_path), eval_every=2, per_kind=1)
    # A run killed after iteration 3 had evaluated at 0 and 2 and recorded ratios of iterations 0-3; its last
    # checkpoint is at iteration 2 (num_iterations = 2).
    _append_csv(recorder.eval_path, EVAL_COLUMNS, [{"iteration": i, "split": "heldout"} for i in (0, 2, 4)])
    _append_csv(recorder.ratio_path, RATIO_COLUMNS, [{"iteration": i, "step": 0} for i in range(4)])
    evaluated = []
    recorder._evaluate = lambda module, iteration: evaluated.append(iteration)
    recorder.on_train_start(None, SimpleNamespace(num_iterations=2))
    assert [r["iteration"] for r in _rows(recorder.eval_path)] == ["0", "2"]
    assert [r["iteration"] for r in _rows(recorder.ratio_path)] == ["0", "1"]  # iterations 2, 3 will rerun
    assert evaluated == []  # the evaluation at 2 is there already
    # Killed between the checkpoint at 2 and that evaluation: it is redone on resume.
    _truncate = [r for r in _rows(recorder.eval_path) if r["iteration"] == "0"]
    os.remove(recorder.eval_path)
    _append_csv(recorder.eval_path, EVAL_COLUMNS, _truncate)
    recorder.on_train_start(None, SimpleNamespace(num_iterations=2))
    assert evaluated == [2]


def test_a_run_stopped_before_its_budget_is_not_marked_done(tmp_path, monkeypatch):
    """A run that SIGTERM/Ctrl-C stops (GracefulShutdown ends fit early) must not get done.json: it was once
    marked finished at iteration 1, and the benchmark went on to the next run."""
    import lightning.pytorch as pl

    from guardrl.toy.benchmark_runs import RunSpec, run_one

    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *args, **kwargs: None)  # stops before iteration 1
    spec = RunSpec("flow_grpo", 0, "published")
    with pytest.raises(RuntimeError, match=r"flow_grpo-published-s0: stopped after 0 of 2 iterations"):
        run_one(spec, QUICK, os.path.join(REPO_ROOT, "configs", "toy"), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "runs", spec.name, "done.json"))
