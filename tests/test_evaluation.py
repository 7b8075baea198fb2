"""Held-out evaluation (guardrl/evaluation.py, guardrl/callbacks/evaluation.py) and `guardrl validate`.

On the tiny SD3 model: the evaluation samples with its own steps, guidance and image size; its per-group
values add up to the overall ones; its noise does not depend on batching; `guardrl validate` on the run's
last checkpoint reproduces the run's own last evaluation exactly and writes to a new log folder; the EMA
weights are used when the run keeps them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import guardrl.run_sampling as run_sampling
from conftest import tiny_fit_args
from guardrl.analysis import load_scalars
from guardrl.cli import main
from guardrl.evaluation import SamplerSettings, image_seed

COLORS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture
def files(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(f"a picture of thing {i}" for i in range(20)) + "\n")
    held_out = tmp_path / "held_out.jsonl"
    rows = [{"prompt": p, "tag": "colors"} for p in COLORS] + [{"prompt": "two cats", "tag": "counting"}]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(train), str(held_out)


def _evaluation(prompts: str, **settings) -> dict:
    return {
        "class_path": "guardrl.callbacks.Evaluation",
        "init_args": {
            "prompts": prompts,
            "group_field": "tag",
            "metrics": [
                {"class_path": "guardrl.gold.ImageDetail"},
                {"class_path": "guardrl.rewards.JpegCompressibility", "init_args": {"name": "jpeg_gold"}},
            ],
            "every_n_iterations": 2,
            "grid_prompts": 2,
            **settings,
        },
    }


def _args(subcommand, train, log_dir, callbacks, **overrides):
    return [
        subcommand,
        *tiny_fit_args(
            train, log_dir, **{"--trainer.callbacks": json.dumps(callbacks), **overrides}
        ),
    ]


def _at(scalars, tag):
    rows = scalars[scalars.tag == tag]
    return dict(zip(rows.step.tolist(), rows.value.tolist()))


def test_fit_evaluates_per_group_and_validate_reproduces_the_last_evaluation(files, tmp_path, capsys):
    train, held_out = files
    log_dir = str(tmp_path / "logs")
    callbacks = [_evaluation(held_out, num_inference_steps=3, height=48, width=48)]
    main(_args("fit", train, log_dir, callbacks, **{"--model.max_iterations": "3"}))
    run = os.path.join(log_dir, "guardrl", "version_0")
    scalars = load_scalars(run)
    # before the first iteration, every 2 and after the last (evaluate_at_end)
    for tag in ("eval/proxy", "eval/image_detail", "eval/jpeg_gold", "eval/jpeg_gold/colors",
                "eval/image_detail/counting", "eval/proxy/counting"):
        assert sorted(_at(scalars, tag)) == [0, 2, 3], tag
    for metric in ("proxy", "image_detail", "jpeg_gold"):
        overall = _at(scalars, f"eval/{metric}")
        colors, counting = _at(scalars, f"eval/{metric}/colors"), _at(scalars, f"eval/{metric}/counting")
        for step in (0, 2, 3):
            # both metrics are means over images: 3 prompts of colors, 1 of counting, 2 images each
            assert overall[step] == pytest.approx((3 * colors[step] + counting[step]) / 4, rel=1e-6)
    # the gold JPEG reward is the run's own reward: the same numbers as the proxy
    assert _at(scalars, "eval/jpeg_gold") == _at(scalars, "eval/proxy")
    # and the evaluation images are not the training ones (48 px, 3 steps; the run trains at 128 px):
    # JPEG sizes of 48 px images are far smaller
    assert _at(scalars, "eval/proxy")[0] > 0.5 * _at(scalars, "reward/mean")[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run, size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("eval/grid")
    assert [g.step for g in grids] == [0, 2, 3]
    # 2 prompts x 2 samples of 48 px images (enlarged x2 to the 96 px minimum cell, plus labels)
    assert grids[0].width > 2 * 96 and grids[0].height > 2 * 96

    before = sorted(os.listdir(run))
    capsys.readouterr()
    main(["validate", "--config", os.path.join(run, "config.yaml"), "--ckpt_path", "last"])
    printed = capsys.readouterr().out
    assert "guardrl validate: 8 images of" in printed and "at iteration 3" in printed
    assert sorted(os.listdir(run)) == before  # the run's folder is untouched
    with open(os.path.join(log_dir, "guardrl", "version_1", "evaluation.json")) as f:
        report = json.load(f)
    assert report["iteration"] == 3 and report["num_images"] == 8
    assert report["settings"]["num_inference_steps"] == 3 and report["settings"]["weights"] == "auto"
    # the same weights, seeds and sampler as the run's evaluation after its last iteration: the same values
    # (TensorBoard keeps float32)
    assert report["proxy"] == pytest.approx(_at(scalars, "eval/proxy")[3], rel=1e-6)
    for name, value in report["metrics"].items():
        assert value == pytest.approx(_at(scalars, f"eval/{name}")[3], rel=1e-6), name
    for group, value in report["metrics_per_group"]["image_detail"].items():
        assert value == pytest.approx(_at(scalars, f"eval/image_detail/{group}")[3], rel=1e-6)
    # and not the values of the untrained model (the run's LoRA moved the images)
    assert report["metrics"]["image_detail"] != pytest.approx(_at(scalars, "eval/image_detail")[0], rel=1e-9)


def test_the_evaluation_samples_with_its_own_steps_guidance_size_and_ode(files, tmp_path, monkeypatch):
    train, held_out = files
    calls = []
    original = run_sampling.sample_trajectory

    def spy(backbone, transformer, cond, noise, sigmas, scales, guidance, *args, **kwargs):
        calls.append((len(sigmas) - 1, guidance, tuple(noise.shape[1:]), float(scales.abs().sum())))
        return original(backbone, transformer, cond, noise, sigmas, scales, guidance, *args, **kwargs)

    monkeypatch.setattr(run_sampling, "sample_trajectory", spy)
    callbacks = [
        _evaluation(
            held_out, num_inference_steps=3, guidance_scale=2.5, height=48, width=64, every_n_iterations=5
        )
    ]
    main(_args("fit", train, str(tmp_path / "logs"), callbacks, **{"--model.max_iterations": "1"}))
    evaluation = [c for c in calls if c[0] == 3]
    training = [c for c in calls if c[0] == 4]
    assert len(evaluation) == 2 and len(training) == 1  # before iteration 0 and after the last
    # the tiny SD3's latents: 4 channels at 1/8 of the image size, height 48 x width 64
    assert {c[1:] for c in evaluation} == {(2.5, (4, 6, 8), 0.0)}  # ODE: no noise on any step
    steps, guidance, shape, noise = training[0]
    assert guidance == 1.0 and shape == (4, 16, 16) and noise > 0  # the run's own: 128 px, CFG off, SDE


def test_evaluation_noise_depends_on_seed_prompt_and_sample_not_on_batching(files, tmp_path):
    seeds = {image_seed(1234, i, j) for i in range(3) for j in range(3)}
    assert len(seeds) == 9 and image_seed(1234, 1, 2) == image_seed(1234, 1, 2)
    assert image_seed(1234, 1, 2) != image_seed(1235, 1, 2)
    train, held_out = files
    reports = []
    for k, settings in enumerate(({"batch_size": 1}, {"batch_size": 16}, {"batch_size": 16, "seed": 99})):
        log_dir = str(tmp_path / f"logs{k}")
        # the base model (no --ckpt_path): the weights are the same, only the batching (or seed) differs
        main(_args("validate", train, log_dir, [_evaluation(held_out, **settings)]))
        with open(os.path.join(log_dir, "guardrl", "version_0", "evaluation.json")) as f:
            reports.append(json.load(f))
    one, sixteen, other_seed = reports
    assert one["settings"]["batch_size"] == 1 and one["iteration"] == 0
    # the same noise per image: equal up to float32 arithmetic over other batch shapes (~1e-8 here), where
    # other noise (another seed) moves the image statistics by orders of magnitude more
    assert one["metrics"]["image_detail"] == pytest.approx(sixteen["metrics"]["image_detail"], rel=1e-6)
    other = other_seed["metrics"]["image_detail"]
    assert other != pytest.approx(sixteen["metrics"]["image_detail"], rel=1e-4)
    # (JPEG sizes are whole bytes: a 1e-8 pixel change can move one by a byte, so they are not compared)


def test_the_evaluation_uses_the_ema_when_the_run_keeps_one(files, tmp_path):
    train, held_out = files
    log_dir = str(tmp_path / "logs")
    callbacks = [
        _evaluation(held_out, every_n_iterations=1),  # weights: auto
        _evaluation(held_out, every_n_iterations=1, weights="policy", name="eval_policy"),
    ]
    overrides = {"--model.max_iterations": "2", "--model.grpo.ema_decay": "0.9"}
    main(_args("fit", train, log_dir, callbacks, **overrides))
    scalars = load_scalars(os.path.join(log_dir, "guardrl", "version_0"))
    auto, policy = _at(scalars, "eval/image_detail"), _at(scalars, "eval_policy/image_detail")
    assert sorted(auto) == sorted(policy) == [0, 1, 2]
    assert auto[0] == policy[0]  # before any update the EMA is the policy
    # after updates the EMA (decay 0.9) lags the policy: other weights, other images
    assert auto[2] != pytest.approx(policy[2], rel=1e-7)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"weights": "emma"}, "evaluation.weights must be one of 'auto', 'ema', 'policy'"),
        ({"sampler": "euler"}, "evaluation.sampler must be 'ode' or 'sde', got 'euler'"),
        ({"num_inference_steps": 1}, "evaluation.num_inference_steps must be an integer >= 2 or null, got 1"),
        ({"guidance_scale": float("nan")}, "evaluation.guidance_scale must be a finite number >= 0 or null"),
        ({"height": 8}, "evaluation.height must be an integer >= 16 or null, got 8"),
        ({"batch_size": 0}, "evaluation.batch_size must be an integer >= 1, got 0"),
    ],
)
def test_sampler_settings_are_checked(settings, message):
    with pytest.raises(ValueError) as raised:
        SamplerSettings(**settings).check("evaluation")
    assert message in str(raised.value)


def test_an_evaluation_at_an_image_size_the_model_cannot_sample_is_refused_before_sampling(files, tmp_path):
    train, held_out = files
    callbacks = [_evaluation(held_out, height=50)]
    with pytest.raises(ValueError) as raised:
        main(_args("fit", train, str(tmp_path / "logs"), callbacks))
    assert "evaluation.height=50 is not allowed for this model: it must be a multiple of 16" in str(
        raised.value
    )
    assert not np.any([name.endswith(".ckpt") for _, _, names in os.walk(tmp_path) for name in names])


def test_ema_weights_on_a_run_without_ema_are_refused(files, tmp_path):
    train, held_out = files
    with pytest.raises(ValueError) as raised:
        main(_args("fit", train, str(tmp_path / "logs"), [_evaluation(held_out, weights="ema")]))
    assert "evaluation.weights='ema' but the run keeps no EMA (model.grpo.ema_decay is null)" in str(
        raised.value
    )


def test_validate_needs_an_evaluation(files, tmp_path):
    train, _ = files
    with pytest.raises(ValueError, match="guardrl validate: the config has no evaluation; add "):
        main(["validate", *tiny_fit_args(train, str(tmp_path / "logs"))])


def test_metric_that_is_neither_reward_nor_metric_is_refused(files):
    from guardrl.callbacks import Evaluation

    _, held_out = files
    with pytest.raises(ValueError) as raised:
        Evaluation(held_out, metrics=[torch.nn.Identity()])
    assert "evaluation.metrics[0] must be a guardrl Reward" in str(raised.value)
    assert "got Identity" in str(raised.value)


def _commented_watch_block(path: str) -> dict:
    import yaml

    lines = open(path, encoding="utf-8").read().splitlines()
    start = lines.index("# trainer:")
    block = [line[2:] for line in lines[start:] if line.startswith("# ") or line == "#"]
    return yaml.safe_load("\n".join(block))


@pytest.mark.parametrize(
    "path",
    sorted(
        os.path.join(d, f)
        for d in ("configs/sd35m", "configs/flux")
        for f in os.listdir(d)
        if f.endswith(".yaml")
    ),
)
def test_each_published_recipe_carries_a_watch_block_that_fits_the_classes(path):
    """The commented evaluation block of each SD3.5-M / FLUX.1 recipe, uncommented, names real classes and
    only arguments they take (their weights need the hub, so they are not built here)."""
    import importlib
    import inspect

    callbacks = _commented_watch_block(path)["trainer"]["callbacks"]

    def check(spec):
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        accepted = set(inspect.signature(cls.__init__).parameters)
        assert set(spec.get("init_args", {})) <= accepted, (spec["class_path"], spec.get("init_args"))
        return cls

    from guardrl.callbacks import OverOptimizationWatch
    from guardrl.rewards import Reward

    (watch,) = callbacks
    assert check(watch) is OverOptimizationWatch
    assert watch["init_args"]["num_inference_steps"] == (28 if "flux" in path else 40)
    assert [issubclass(check(g), Reward) for g in watch["init_args"]["gold"]] == [True, True, True]
    assert ("group_field" in watch["init_args"]) == ("geneval" in path)


@pytest.mark.slow
def test_validate_on_two_ddp_or_fsdp2_processes_gives_the_one_process_numbers(files, tmp_path):
    """Prompt i is sampled on rank i % 2 from its own seeds, and sums, counts and Metric states are reduced
    over ranks: two processes, DDP or FSDP2 (sharded transformer), evaluate the same images as one (3 prompts:
    the ranks hold 2 and 1)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    _, held_out = files
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    reports = {}
    strategies = {
        "one": ["--trainer.devices", "1"],
        "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
        "fsdp2": ["--trainer.devices", "2", "--config", "configs/strategy/fsdp.yaml"],
    }
    for name, strategy in strategies.items():
        out = tmp_path / name
        command = [
            sys.executable, "-m", "guardrl.cli", "validate", "--config", "configs/tiny/grpo_guard.yaml",
            "--trainer.accelerator", "cpu", *strategy,
            "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.callbacks", json.dumps([_evaluation(held_out, max_prompts=3, grid_prompts=3)]),
        ]
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        (report,) = [
            os.path.join(root, "evaluation.json")
            for root, _, names in os.walk(out)
            if "evaluation.json" in names
        ]
        with open(report) as f:
            reports[name] = json.load(f)
    one = reports["one"]
    assert set(one["proxy_per_group"]) == {"colors"}  # the first 3 prompts are the colour ones
    for name in ("ddp", "fsdp2"):
        two = reports[name]
        assert one["num_images"] == two["num_images"] == 6
        assert one["metrics"]["image_detail"] == pytest.approx(two["metrics"]["image_detail"], rel=1e-6)
        assert one["metrics_per_group"]["image_detail"] == pytest.approx(
            two["metrics_per_group"]["image_detail"], rel=1e-6
        )
        # JPEG sizes are whole bytes (0.001 KB): float32 differences of other batch shapes may move one a byte
        assert one["proxy_per_group"] == pytest.approx(two["proxy_per_group"], abs=0.01)
