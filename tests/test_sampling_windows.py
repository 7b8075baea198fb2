"""SDE window strategies (guardrl/sampling/windows.py) and the shared ODE prefix (guardrl/rollouts.py).

fixed: the whole range every iteration; random: a window drawn per iteration, the same on every rank
(Flow-GRPO-Fast); sliding: a window that moves every N iterations (MixGRPO). With same_noise_per_group the
deterministic steps before the window run once per group. A run with a moving window trains the windows it
says it does, and a resumed run the same ones as the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_fit_args
from guardrl.cli import main
from guardrl.options import GRPOOptions, SamplingOptions, check_compatible
from guardrl.rollouts import sample_trajectory
from guardrl.sampling import WINDOW_STRATEGIES, noise_scales, sde_window_at


def test_the_strategies_are_the_registry():
    assert WINDOW_STRATEGIES == ("fixed", "random", "sliding")


def test_fixed_is_the_range_whatever_the_iteration():
    assert [sde_window_at("fixed", (1, 7), None, i) for i in (0, 5, 99)] == [(1, 7)] * 3


def test_sliding_moves_by_its_stride_every_n_iterations_then_stays_or_wraps():
    # range [0, 7), size 3: starts 0..4 fit. stride 2, every 2 iterations: 0, 0, 2, 2, 4, 4, then the next
    # start (6) would not fit: it stays at 4, or wraps to 0.
    stay = [sde_window_at("sliding", (0, 7), 3, i, slide_every=2, stride=2) for i in range(9)]
    assert stay == [(0, 3), (0, 3), (2, 5), (2, 5), (4, 7), (4, 7), (4, 7), (4, 7), (4, 7)]
    wrap = [sde_window_at("sliding", (0, 7), 3, i, slide_every=2, stride=2, wrap=True) for i in range(9)]
    assert wrap == [(0, 3), (0, 3), (2, 5), (2, 5), (4, 7), (4, 7), (0, 3), (0, 3), (2, 5)]
    # stride null = the window's size (MixGRPO's non-overlapping windows), inside a range that starts at 2
    # (the start 8 would not fit: the window stays at the range's last position, [6, 9))
    assert [sde_window_at("sliding", (2, 9), 3, i) for i in range(4)] == [(2, 5), (5, 8), (6, 9), (6, 9)]


def test_random_windows_are_a_function_of_the_seed_and_cover_every_position():
    draws = [sde_window_at("random", (1, 6), 2, iteration=i, random_seed=1000 + i) for i in range(200)]
    assert all(1 <= start and end == start + 2 and end <= 6 for start, end in draws)
    assert {start for start, _ in draws} == {1, 2, 3, 4}  # every position of [1, 6) with size 2
    again = [sde_window_at("random", (1, 6), 2, iteration=i, random_seed=1000 + i) for i in range(200)]
    assert again == draws


def test_options_validate_the_window_strategy():
    S = SamplingOptions
    ok = S(num_inference_steps=10, sde_window=(0, 5), sde_window_strategy="sliding", sde_window_size=3)
    assert ok.sde_steps_per_iteration() == 3
    assert ok.window_at(0, 0) == (0, 3) and ok.window_at(1, 0) == (2, 5)  # start 3 would not fit: 2
    with pytest.raises(ValueError, match=r"sampling\.sde_window_size=3 is only used by a moving window"):
        S(sde_window_size=3)
    with pytest.raises(ValueError, match=r"sampling\.sde_window_size must be an integer in \[1, 5\].*got 6"):
        S(num_inference_steps=10, sde_window=(0, 5), sde_window_strategy="random", sde_window_size=6)
    with pytest.raises(ValueError, match=r"sampling\.sde_window_size must be an integer in \[1, 9\].*None"):
        S(sde_window_strategy="sliding")
    with pytest.raises(ValueError, match=r"sampling\.sde_window_slide_every must be an integer >= 1, got 0"):
        S(sde_window_strategy="sliding", sde_window_size=2, sde_window_slide_every=0)
    with pytest.raises(ValueError, match=r"sampling\.sde_window_strategy must be one of 'fixed', 'random', "):
        S(sde_window_strategy="progressive")
    # the trained steps must fit in one window, not in the range it moves in
    moving = S(num_inference_steps=10, sde_window_strategy="random", sde_window_size=3)
    with pytest.raises(ValueError, match=r"grpo\.num_train_timesteps=4 must be <= 3 .*sde_window_size=3"):
        check_compatible(moving, GRPOOptions(num_train_timesteps=4))
    check_compatible(moving, GRPOOptions(num_train_timesteps=3))


class CountingBackbone:
    """A backbone stand-in for sample_trajectory: v = -x, and the batch size of every call is recorded."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def velocity(self, latents, t, cond, guidance_scale, transformer):
        self.batch_sizes.append(latents.shape[0])
        return -latents


class Rows:
    """A conditioning stand-in whose select() is recorded."""

    def __init__(self, n):
        self.n = n

    def select(self, index):
        return Rows(len(range(self.n)[index]))


def test_a_shared_prefix_runs_once_per_group_and_gives_the_same_trajectory():
    group, groups, steps = 4, 3, 6
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    scales = noise_scales(sigmas, 0.7, "flow_grpo", range(3, 5))  # window [3, 5): steps 0-2 are Euler
    noise = torch.randn(groups, 2, 4, 4, generator=torch.Generator().manual_seed(0)).repeat_interleave(
        group, 0
    )

    def roll(prefix_group):
        backbone = CountingBackbone()
        trajectory = sample_trajectory(
            backbone, None, Rows(group * groups), noise, sigmas, scales, 1.0, "mean",
            torch.Generator().manual_seed(7), shared_prefix_group_size=prefix_group,
        )  # fmt: skip
        return trajectory, backbone.batch_sizes

    shared, shared_calls = roll(group)
    plain, plain_calls = roll(1)
    # the 3 prefix steps on one sample per group, then the window and the rest on all 12
    assert shared_calls == [3, 3, 3, 12, 12, 12] and plain_calls == [12] * 6
    assert shared.step_indices == plain.step_indices == [3, 4]
    for name in ("latents_BTCHW", "next_latents_BTCHW", "mean_old_BTCHW", "log_prob_old_BT", "final_latents"):
        torch.testing.assert_close(getattr(shared, name), getattr(plain, name), rtol=0, atol=1e-6)
    # the window's noise is drawn after the prefix in both: the same draws, so the branches are the same
    assert not torch.equal(shared.next_latents_BTCHW[0], shared.next_latents_BTCHW[1])  # the group branched


def test_a_shared_prefix_refuses_groups_with_different_noise():
    sigmas = torch.linspace(1.0, 0.0, 5)
    scales = noise_scales(sigmas, 0.7, "flow_grpo", range(2, 4))
    noise = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"groups of 2 samples with the same initial noise"):
        sample_trajectory(CountingBackbone(), None, Rows(4), noise, sigmas, scales, 1.0, "mean", None,
                          shared_prefix_group_size=2)  # fmt: skip


class WindowRecorder:
    def __init__(self):
        self.steps: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append([s.step_index for s in outputs["step_stats"]])


def _window_run(prompt_file, root, iterations, ckpt_path=None):
    from lightning.pytorch.callbacks import Callback

    class Recorder(WindowRecorder, Callback):
        pass

    args = tiny_fit_args(
        prompt_file,
        str(root),
        **{
            "--model.sampling.num_inference_steps": "6",
            "--model.sampling.sde_window": "[0, 5]",
            "--model.sampling.sde_window_strategy": "sliding",
            "--model.sampling.sde_window_size": "2",
            "--model.sampling.sde_window_stride": "1",
            "--model.sampling.same_noise_per_group": "true",
            "--model.max_iterations": str(iterations),
            "--checkpoint.dirpath": str(root / "ckpt"),
            "--checkpoint.every_n_iterations": "1",
            "--trainer.logger": "false",
        },
    )
    cli = main(args, run=False)
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    assert float(cli.trainer.callback_metrics["sampling/sde_window_start"]) == recorder.steps[-1][0]
    return cli.model, recorder.steps


@pytest.mark.slow
def test_a_sliding_window_run_trains_its_windows_and_resumes_exactly(prompt_file, tmp_path):
    straight, steps = _window_run(prompt_file, tmp_path / "straight", 4)
    # window of 2 moving by 1 every iteration: [0, 2), [1, 3), [2, 4), [3, 5); every step of it trained
    assert steps == [[0, 1], [1, 2], [2, 3], [3, 4]]
    _window_run(prompt_file, tmp_path / "resumed", 2)
    resumed, resumed_steps = _window_run(
        prompt_file, tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "resumed" / "ckpt" / "last.ckpt")
    )
    assert resumed_steps == [[2, 3], [3, 4]]  # the resumed run continues where the window was
    a = dict(straight.policy.transformer.named_parameters())
    b = dict(resumed.policy.transformer.named_parameters())
    lora = [name for name in a if "lora_" in name]
    assert lora and all(torch.equal(a[name], b[name]) for name in lora)
