"""The over-optimization watch (guardrl/callbacks/watch.py) on a run that over-optimizes: the tiny model's
proxy is JPEG compressibility, which a policy games by flattening images, so the gold stand-in ImageDetail
(per-image pixel std on held-out prompts) falls while the proxy rises. The watch must fire, stop the run, and
keep the checkpoint of the best gold score."""

from __future__ import annotations

import glob
import json
import logging
import os

import pytest
import torch

from conftest import tiny_fit_args
from guardrl.analysis import load_scalars
from guardrl.callbacks import OverOptimizationWatch
from guardrl.cli import main
from guardrl.gold import ImageDetail


def _watch_args(prompt_file, eval_file, log_dir, max_iterations=8, **watch):
    settings = {
        "eval_prompts": eval_file,
        "gold": [{"class_path": "guardrl.gold.ImageDetail"}],
        "every_n_iterations": 1,
        "samples_per_prompt": 2,
        **watch,
    }
    callbacks = json.dumps([{"class_path": "guardrl.callbacks.OverOptimizationWatch", "init_args": settings}])
    return [
        "fit",
        *tiny_fit_args(
            prompt_file,
            log_dir,
            **{
                "--model.max_iterations": str(max_iterations),
                "--trainer.callbacks": callbacks,
                "--model.optimizer": '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}',
                "--model.grpo.ratio_variant": "flow_grpo",
                "--model.grpo.clip_range": "0.5",
                "--checkpoint.every_n_iterations": "1",
                "--checkpoint.save_top_k": "-1",
            },
        ),
    ]


@pytest.fixture
def files(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(f"a picture of thing {i}" for i in range(20)) + "\n")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a red circle\na blue square\n")
    return str(train), str(held_out)


def test_watch_fires_stops_and_keeps_the_best_gold_checkpoint(files, tmp_path, caplog):
    train, held_out = files
    with caplog.at_level(logging.WARNING, logger="guardrl.callbacks.watch"):
        cli = main(
            # evaluation seed 0: gold first rises (best at iteration 6), then falls while the proxy rises
            _watch_args(
                train, held_out, str(tmp_path / "runs"), 12, tolerance=0.005, stop_on_divergence=True, seed=0
            )
        )
    watch = next(c for c in cli.trainer.callbacks if isinstance(c, OverOptimizationWatch))
    assert watch.fired_at is not None and "over-optimization at iteration" in caplog.text
    assert cli.model.num_iterations == watch.fired_at < 12  # stopped right there

    scalars = load_scalars(str(tmp_path / "runs" / "guardrl"))
    series = {tag: dict(zip(frame.step, frame.value)) for tag, frame in scalars.groupby("tag")}
    gold, proxy = series["gold/average"], series["watch/proxy"]
    assert sorted(gold) == list(
        range(watch.fired_at + 1)
    )  # evaluated before training and after each iteration
    assert gold[0] == pytest.approx(1.0)
    best = max(gold, key=gold.get)
    assert watch.best["iteration"] == best
    # Fired because the proxy rose since the best-gold evaluation while gold fell by more than the tolerance.
    assert proxy[watch.fired_at] > proxy[best]
    assert gold[best] - gold[watch.fired_at] > 0.005
    assert series["watch/diverging"][watch.fired_at] == 1.0
    assert all(series["watch/diverging"][i] == 0.0 for i in range(watch.fired_at))

    # The kept checkpoint is the best-gold state: the same weights as the periodic checkpoint of that
    # iteration.
    directory = os.path.dirname(
        glob.glob(str(tmp_path / "runs" / "guardrl" / "version_0" / "checkpoints" / "best_gold.ckpt"))[0]
    )
    kept = torch.load(os.path.join(directory, "best_gold.ckpt"), weights_only=True)
    assert kept["guardrl"]["num_iterations"] == best
    periodic = torch.load(os.path.join(directory, f"iteration={best}.ckpt"), weights_only=True)
    assert all(torch.equal(kept["state_dict"][k], periodic["state_dict"][k]) for k in periodic["state_dict"])


def test_without_stopping_the_run_goes_on_and_a_lax_tolerance_never_fires(files, tmp_path):
    train, held_out = files
    cli = main(_watch_args(train, held_out, str(tmp_path / "runs"), tolerance=0.5, every_n_iterations=4))
    watch = next(c for c in cli.trainer.callbacks if isinstance(c, OverOptimizationWatch))
    assert cli.model.num_iterations == 8 and watch.fired_at is None
    scalars = load_scalars(str(tmp_path / "runs" / "guardrl"))
    assert sorted(scalars[scalars.tag == "gold/image_detail"].step) == [0, 4, 8]


def test_image_detail_is_the_mean_per_image_std_and_sums_over_updates():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    metric = ImageDetail()
    metric.update(images[:1], ["a"])
    metric.update(images[1:], ["b", "c", "d"])
    expected = torch.stack([image.double().flatten().std() for image in images]).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gold": []}, r"watch.gold must list at least one gold metric"),
        ({"every_n_iterations": 0}, r"watch.every_n_iterations must be an integer >= 1, got 0"),
        ({"sampler": "dpm"}, r"watch.sampler must be 'ode' or 'sde', got 'dpm'"),
        ({"gold": [ImageDetail(), ImageDetail()]}, r"watch.gold: two metrics are named 'image_detail'"),
        ({"patience": 0}, r"watch.patience must be an integer >= 1, got 0"),
        ({"eval_prompts": "missing.txt"}, r"watch.eval_prompts='missing.txt'"),
    ],
)
def test_bad_watch_settings_are_refused(files, kwargs, message):
    _, held_out = files
    settings = {"eval_prompts": held_out, "gold": [ImageDetail()], **kwargs}
    with pytest.raises(ValueError, match=message):
        OverOptimizationWatch(**settings)
