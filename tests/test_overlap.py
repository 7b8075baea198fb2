"""Chunked rollouts and rewards overlapped with the next chunk's rollout (performance.rollout_chunks,
performance.overlap_rewards): same training whether overlapped or not, rewards aligned with their images,
a chunk really scored while the next one samples, and a failing reward still failing the run."""

import json
import threading

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import guardrl.module
from guardrl.cli import main
from guardrl.rewards import JpegCompressibility, RewardError
from guardrl.rewards.base import Reward
from guardrl.types import Trajectory
from tests.conftest import tiny_fit_args

CHUNKED = {"--model.performance.rollout_chunks": "2"}
OVERLAPPED = {**CHUNKED, "--model.performance.overlap_rewards": "true"}


class CaptureOutputs(Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def _fit(prompt_file, log_dir, callbacks=(), **overrides):
    cli = main(
        tiny_fit_args(prompt_file, str(log_dir), **{"--trainer.logger": "false", **overrides}), run=False
    )
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli.model


def test_overlapped_rewards_train_exactly_like_serial_chunks(prompt_file, tmp_path):
    weights, rewards = {}, {}
    for name, overrides in (("serial", CHUNKED), ("overlapped", OVERLAPPED)):
        capture = CaptureOutputs()
        model = _fit(prompt_file, tmp_path / name, [capture], **overrides)
        weights[name] = [p.detach().clone() for p in model.policy.trainable_parameters()]
        rewards[name] = [o["rewards"] for o in capture.outputs]
    assert len(rewards["serial"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(rewards["serial"], rewards["overlapped"]))
    assert all(torch.equal(a, b) for a, b in zip(weights["serial"], weights["overlapped"]))


def test_chunked_rewards_belong_to_their_images_and_chunks_draw_their_own_noise(prompt_file, tmp_path):
    capture = CaptureOutputs()
    _fit(prompt_file, tmp_path / "chunked", [capture], **OVERLAPPED)
    unchunked = CaptureOutputs()
    _fit(prompt_file, tmp_path / "whole", [unchunked])
    for out in capture.outputs:
        assert out["images"].shape[0] == 4 and out["rewards"].shape == (4,)
        # the JPEG reward of the returned images, scored at once, is the reward the run used, in order
        assert torch.equal(JpegCompressibility()(out["images"], out["prompts"]), out["rewards"])
    # chunk c draws from (seed, iteration, rank, c): different images from the unchunked run's stream
    assert not torch.equal(capture.outputs[0]["images"], unchunked.outputs[0]["images"])


def test_trajectory_cat_joins_chunks_along_the_batch():
    def part(value, batch):
        z = torch.full((batch, 2, 1, 2, 2), float(value))
        return Trajectory(
            [1, 2],
            z,
            z + 1,
            z + 2,
            torch.full((batch, 2), float(value)),
            torch.tensor([1.0, 0.5]),
            torch.tensor([0.5, 0.0]),
            torch.ones(2),
            z[:, 0],
        )

    joined = Trajectory.cat([part(0, 2), part(1, 3)])
    assert joined.latents_BTCHW.shape == (5, 2, 1, 2, 2) and joined.final_latents.shape == (5, 1, 2, 2)
    assert joined.log_prob_old_BT[:, 0].tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(joined.sigma_T, torch.tensor([1.0, 0.5]))
    other = part(1, 1)
    other.step_indices = [0, 2]
    with pytest.raises(ValueError, match="different steps"):
        Trajectory.cat([part(0, 1), other])


# A reward that, on its first call (chunk 0 of iteration 0), waits for chunk 1's rollout to start. Overlapped,
# the main thread starts that rollout while the worker waits; serial, chunk 1 waits for this call: it times
# out.
NEXT_ROLLOUT_STARTED = threading.Event()
SAW_NEXT_ROLLOUT: list[bool] = []


class WaitsForTheNextRollout(Reward):
    def __init__(self, wait_s: float = 30.0, name: str = "waits") -> None:
        super().__init__(name=name)
        self.wait_s = wait_s

    def score(self, images, prompts):
        if not SAW_NEXT_ROLLOUT:
            SAW_NEXT_ROLLOUT.append(NEXT_ROLLOUT_STARTED.wait(self.wait_s))
        return torch.zeros(images.shape[0])


@pytest.mark.parametrize("overlap,wait_s,expected", [("true", 30.0, True), ("false", 1.0, False)])
def test_a_chunk_is_scored_while_the_next_chunk_samples(
    prompt_file, tmp_path, monkeypatch, overlap, wait_s, expected
):
    NEXT_ROLLOUT_STARTED.clear()
    SAW_NEXT_ROLLOUT.clear()
    rollout = guardrl.module.GRPOModule._rollout

    def recording_rollout(self, cond, batch_size, chunk):
        if chunk == 1:
            NEXT_ROLLOUT_STARTED.set()
        return rollout(self, cond, batch_size, chunk)

    monkeypatch.setattr(guardrl.module.GRPOModule, "_rollout", recording_rollout)
    rewards = json.dumps(
        [{"class_path": f"{__name__}.WaitsForTheNextRollout", "init_args": {"wait_s": wait_s}}]
    )
    _fit(
        prompt_file,
        tmp_path,
        **{
            **CHUNKED,
            "--model.performance.overlap_rewards": overlap,
            "--model.rewards": rewards,
            "--model.max_iterations": "1",
        },
    )
    assert SAW_NEXT_ROLLOUT == [expected]


def test_a_reward_failing_in_the_worker_fails_the_run(prompt_file, tmp_path):
    rewards = json.dumps(
        [{"class_path": "guardrl.rewards.FaultInjectionReward", "init_args": {"raise_at_calls": [1]}}]
    )
    with pytest.raises(RewardError, match="fault_injection_reward"):
        _fit(
            prompt_file,
            tmp_path,
            **{**OVERLAPPED, "--model.rewards": rewards, "--model.faults.reward_max_attempts": "1"},
        )


def test_rollouts_on_the_policy_adapter_equal_rollouts_on_the_synced_old_adapter(
    prompt_file, tmp_path, monkeypatch
):
    # when the old snapshot equals the policy, the rollout runs the policy adapter (no peft switch); forcing
    # the switch to the "old" adapter must give bitwise the same rewards and weights
    runs = {}
    for name in ("skip_switch", "switch"):
        if name == "switch":
            monkeypatch.setattr("guardrl.policy.FlowPolicy.old_equals_policy", lambda self: False)
        capture = CaptureOutputs()
        model = _fit(prompt_file, tmp_path / name, [capture])
        runs[name] = (
            [o["rewards"] for o in capture.outputs],
            [p.detach().clone() for p in model.policy.trainable_parameters()],
        )
    (rewards_a, weights_a), (rewards_b, weights_b) = runs["skip_switch"], runs["switch"]
    assert len(rewards_a) == 2 and all(torch.equal(a, b) for a, b in zip(rewards_a, rewards_b))
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
