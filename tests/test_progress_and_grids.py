"""GRPOProgressBar, ImageGridCallback and RunSummaryCallback: unit checks, then one real tiny fit with the
three added through --trainer.callbacks, checked through its TensorBoard events, its console output and
the progress bar's metrics."""

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from guardrl.callbacks import GRPOProgressBar, ImageGridCallback
from guardrl.callbacks.image_grid import LABEL_HEIGHT, PAD, captions, grid_layout, make_grid
from guardrl.callbacks.run_summary import flatten
from guardrl.cli import main
from tests.conftest import tiny_fit_args

ITERATIONS = 4
GROUP_SIZE, PROMPTS_PER_BATCH = 2, 2


# ------------------------------------------------------------------------------------------ units
def test_make_grid_places_each_group_on_a_row_with_its_rewards():
    images = torch.rand(6, 3, 8, 10)  # 3 groups of 2
    rewards = torch.tensor([0.5, -1.25, 2.0, 3.0, 4.0, 5.0])
    grid = make_grid(images, rewards, group_size=2, max_groups=2)
    scale, height, width = grid_layout((8, 10), rows=2, cols=2)
    assert scale == 10 and grid.shape == (3, height, width)  # 96 px minimum: 10 px images x 10
    assert height == PAD + 2 * (80 + LABEL_HEIGHT + PAD) and width == PAD + 2 * (100 + PAD)
    cell_h = 80 + LABEL_HEIGHT
    for i in range(4):  # only the first max_groups groups, in batch order
        top, left = PAD + (i // 2) * (cell_h + PAD), PAD + (i % 2) * (100 + PAD)
        expected = images[i].repeat_interleave(10, dim=1).repeat_interleave(10, dim=2)
        cell = grid[:, top : top + 80, left : left + 100]
        assert torch.allclose(cell, expected, atol=0.5 / 255)  # through PIL's 8 bits
        label = grid[:, top + 80 : top + cell_h, left : left + 100]
        assert (label < 0.5).any() and (label > 0.99).float().mean() > 0.5  # dark text on white
    with pytest.raises(ValueError, match="whole groups of 4"):
        make_grid(images, rewards, group_size=4, max_groups=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_grid(images[:, :1], rewards, group_size=2, max_groups=1)


def test_captions_list_each_rows_prompt_and_rewards():
    text = captions(["a | b", "a | b", "c", "c"], torch.tensor([1.0, 2.0, 3.5, 4.0]), 2, 4)
    assert text.splitlines()[2:] == ["| 0 | a \\| b | 1, 2 |", "| 1 | c | 3.5, 4 |"]
    assert len(captions(["a", "a", "c", "c"], torch.zeros(4), 2, 1).splitlines()) == 3


@pytest.mark.parametrize("kwargs", [{"every_n_iterations": 0}, {"max_groups": 1.5}, {"max_groups": True}])
def test_image_grid_options_are_checked(kwargs):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        ImageGridCallback(**kwargs)


def test_progress_metrics_average_only_the_steps_trained_last():
    bar = GRPOProgressBar()
    metrics = {
        "reward/mean": torch.tensor(0.25),
        "clip/frac_pos_upper_t1": torch.tensor(0.1),
        "clip/frac_neg_lower_t1": torch.tensor(0.3),
        "clip/frac_pos_upper_t5": torch.tensor(0.9),
        "ratio/mean_t1": torch.tensor(1.0),
    }
    trainer = SimpleNamespace(callback_metrics=metrics, progress_bar_metrics={"reward": 0.25, "v_num": 3})
    bar._trained_steps = {1}  # step 5's value is stale: it was not trained in the last iteration
    assert bar.get_metrics(trainer, None) == pytest.approx(
        {"reward": 0.25, "clip": 0.2, "clip+": 0.1, "clip-": 0.3}
    )
    bar._trained_steps = None  # before any iteration: whatever is there
    assert bar.get_metrics(trainer, None)["clip+"] == pytest.approx(0.5)


def test_progress_bar_counts_from_the_resumed_iteration():
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    bar = GRPOProgressBar()
    bar.train_progress_bar = Tqdm(file=io.StringIO())
    bar._count_iterations(SimpleNamespace(max_iterations=10, num_iterations=4))  # resumed at iteration 4
    assert (bar.train_progress_bar.n, bar.train_progress_bar.initial, bar.train_progress_bar.total) == (
        4,
        4,
        10,
    )
    bar._count_iterations(SimpleNamespace(max_iterations=None, num_iterations=0))
    assert bar.train_progress_bar.total is None  # open-ended: "n/?"


def test_flatten_makes_dotted_keys():
    assert flatten({"_instantiator": "x", "grpo": {"clip_range": 1e-4, "kl": {"beta": 0}}, "lora": None}) == {
        "grpo.clip_range": 1e-4,
        "grpo.kl.beta": 0,
        "lora": None,
    }


# ------------------------------------------------------------------------------------------ a real fit
class _Recorder(Callback):
    """Keeps each iteration's images and rewards, to compare with what the grid callback logged."""

    def __init__(self):
        self.outputs = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs[pl_module.num_iterations - 1] = (
            outputs["images"].clone(),
            outputs["rewards"].clone(),
            list(outputs["prompts"]),
        )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("callbacks")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\ntwo yellow circles\n")
    callbacks = [
        {"class_path": "guardrl.callbacks.GRPOProgressBar"},
        {
            "class_path": "guardrl.callbacks.ImageGridCallback",
            "init_args": {"every_n_iterations": 2, "max_groups": 4},
        },
        {"class_path": "guardrl.callbacks.RunSummaryCallback"},
    ]
    args = tiny_fit_args(
        str(prompts),
        str(root),
        **{
            "--trainer.callbacks": json.dumps(callbacks),
            "--trainer.enable_progress_bar": "true",
            "--trainer.enable_checkpointing": "false",
            "--trainer.logger.init_args.name": "callbacks",
            "--model.max_iterations": str(ITERATIONS),
            "--data.group_size": str(GROUP_SIZE),
            "--data.prompts_per_batch": str(PROMPTS_PER_BATCH),
        },
    )
    cli = main(args, run=False)  # no subcommand: build the trainer, then fit here with the recorder added
    recorder = _Recorder()
    cli.trainer.callbacks.append(recorder)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):  # the bar and the summary print to stdout
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(
        cli.trainer.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0}
    )
    accumulator.Reload()
    return SimpleNamespace(cli=cli, recorder=recorder, console=console.getvalue(), events=accumulator)


def _text(events, tag):
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


def test_image_grid_in_tensorboard(fitted):
    events = fitted.events
    grids = events.Images("images/groups")
    # every 2 iterations from 0, and the last one
    assert [e.step for e in grids] == [0, 2, 3]
    for event in grids:
        images, rewards, prompts = fitted.recorder.outputs[event.step]
        assert images.shape[0] == GROUP_SIZE * PROMPTS_PER_BATCH
        _, height, width = grid_layout(tuple(images.shape[-2:]), rows=PROMPTS_PER_BATCH, cols=GROUP_SIZE)
        assert (event.height, event.width) == (height, width)
        logged = np.asarray(
            Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.float32
        )
        expected = make_grid(images, rewards, GROUP_SIZE, max_groups=4).permute(1, 2, 0).numpy() * 255
        assert np.abs(logged - expected).max() <= 1.0  # the same pixels, up to 8-bit rounding
    captions_by_step = _text(events, "images/groups_captions")
    assert sorted(captions_by_step) == [0, 2, 3]
    _, rewards, prompts = fitted.recorder.outputs[3]
    assert captions_by_step[3] == captions(prompts, rewards, GROUP_SIZE, 4)
    assert prompts[0] in captions_by_step[3] and f"{rewards[0].item():.4g}" in captions_by_step[3]


def test_config_summary_in_tensorboard_and_on_the_console(fitted):
    config = _text(fitted.events, "config")
    assert list(config) == [0]
    text = config[0]
    for expected in (
        "### Model (hyperparameters)",
        "| grpo.ratio_variant | `'grpo_guard'` |",
        "| sampling.num_inference_steps | `4` |",
        f"| max_iterations | `{ITERATIONS}` |",
        "### Model (objects)",
        "TinySD3Backbone",
        "jpeg_compressibility",
        "AdamW (lr 0.01)",
        "### Data",
        f"| prompts_per_batch | `{PROMPTS_PER_BATCH}` |",
        "### Trainer",
        "| world_size | `1` |",
    ):
        assert expected in text, expected
    assert "_instantiator" not in text
    assert "guardrl run: grpo_guard, clip range 0.0001" in fitted.console
    assert "batch per rank: 2 prompts x 2 samples, 1 rank(s)" in fitted.console


def test_progress_bar_counts_iterations_and_shows_reward_and_clip(fitted):
    trainer, model = fitted.cli.trainer, fitted.cli.model
    (bar,) = [cb for cb in trainer.callbacks if isinstance(cb, GRPOProgressBar)]
    assert trainer.progress_bar_callback is bar
    metrics = bar.get_metrics(trainer, model)
    assert list(metrics)[:4] == ["reward", "clip", "clip+", "clip-"] and "v_num" not in metrics
    logged = trainer.callback_metrics
    assert metrics["reward"] == pytest.approx(float(logged["reward/mean"]))
    upper = [float(logged[f"clip/frac_pos_upper_t{k}"]) for k in range(3)]
    lower = [float(logged[f"clip/frac_neg_lower_t{k}"]) for k in range(3)]
    assert metrics["clip"] == pytest.approx(np.mean(upper + lower))
    assert metrics["clip+"] == pytest.approx(np.mean(upper)) and metrics["clip-"] == pytest.approx(
        np.mean(lower)
    )
    # The bar counted GRPO iterations out of model.max_iterations, not batches of an epoch.
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (ITERATIONS, ITERATIONS)
    assert "GRPO iteration: 100%" in fitted.console and f"{ITERATIONS}/{ITERATIONS}" in fitted.console
    assert "reward=" in fitted.console and "clip=" in fitted.console
    assert "v_num" not in fitted.console and "Epoch" not in fitted.console
