"""Surviving faults (docs/reliability.md): non-finite rewards and losses skip the update on every rank, are
counted and logged, and stop the run after `faults.max_consecutive_nonfinite` in a row; failing or hanging
rewards are retried within bounds and then fail the run loudly; checkpoints are written atomically; a
signal under SLURM checkpoints, exits cleanly and requeues."""

from __future__ import annotations

import glob
import math
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, tiny_fit_args
from guardrl.callbacks import GracefulShutdown
from guardrl.checkpointing import AtomicCheckpointIO
from guardrl.cli import main
from guardrl.rewards import FaultInjectionReward, RewardError, score_with_retries


def _fault_reward(**init_args) -> str:
    import json

    return json.dumps([{"class_path": "guardrl.rewards.FaultInjectionReward", "init_args": init_args}])


def _fit_args(prompt_file, tmp_path, **overrides):
    settings = {
        "--checkpoint.every_n_iterations": "1",
        "--checkpoint.save_top_k": "-1",
        "--model.faults.reward_retry_delay_s": "0",
        **overrides,
    }
    return ["fit", *tiny_fit_args(prompt_file, str(tmp_path / "runs"), **settings)]


def _scalars(tmp_path, tag):
    (version_dir,) = glob.glob(str(tmp_path / "runs" / "guardrl" / "version_*"))
    accumulator = EventAccumulator(version_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _adapter(checkpoint_path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if ".default." in k}


def _checkpoints(tmp_path) -> str:
    (directory,) = glob.glob(str(tmp_path / "runs" / "guardrl" / "version_*" / "checkpoints"))
    return directory


# ---------------------------------------------------------------- non-finite values
def test_nan_reward_skips_the_update_counts_it_and_the_run_continues(prompt_file, tmp_path):
    cli = main(
        _fit_args(
            prompt_file,
            tmp_path,
            **{"--model.rewards": _fault_reward(nan_at_calls=[1]), "--model.max_iterations": "3"},
        )
    )
    model = cli.model
    assert (
        model.num_iterations == 3 and model.num_skipped_updates == 1 and model.skipped_updates.in_a_row == 0
    )
    assert _scalars(tmp_path, "train/skipped_update") == [(0, 0.0), (1, 1.0), (2, 0.0)]
    assert _scalars(tmp_path, "train/num_skipped_updates") == [(0, 0.0), (1, 1.0), (2, 1.0)]
    assert [step for step, _ in _scalars(tmp_path, "train/num_optimizer_steps")] == [0, 1, 2]
    assert [value for _, value in _scalars(tmp_path, "train/num_optimizer_steps")] == [2.0, 0.0, 2.0]
    rewards = dict(_scalars(tmp_path, "reward/mean"))
    assert math.isnan(rewards[1]) and math.isfinite(rewards[0]) and math.isfinite(rewards[2])
    # No ratio statistics for a skipped update: step 1 has none, the others have them.
    assert [step for step, _ in _scalars(tmp_path, "ratio/mean_t0")] == [0, 2]
    # The skipped iteration did not touch the trained adapter; the next one did.
    directory = _checkpoints(tmp_path)
    after = [_adapter(os.path.join(directory, f"iteration={i}.ckpt")) for i in (1, 2, 3)]
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])
    assert (
        torch.load(os.path.join(directory, "last.ckpt"), weights_only=True)["guardrl"]["num_skipped_updates"]
        == 1
    )


def test_run_stops_with_a_clear_error_after_the_configured_number_in_a_row(prompt_file, tmp_path):
    args = _fit_args(
        prompt_file,
        tmp_path,
        **{
            "--model.rewards": _fault_reward(nan_at_calls=[1, 2]),
            "--model.max_iterations": "5",
            "--model.faults.max_consecutive_nonfinite": "2",
        },
    )
    with pytest.raises(
        RuntimeError,
        match=r"2 GRPO iterations in a row \(the last: iteration 2\) skipped their "
        r"update because of a non-finite reward.*max_consecutive_nonfinite=2",
    ):
        main(args)
    # The last good state is on disk; the failed iterations are not checkpointed as if they were fine.
    last = torch.load(os.path.join(_checkpoints(tmp_path), "last.ckpt"), weights_only=True)["guardrl"]
    assert last["num_iterations"] == 2 and last["num_skipped_updates"] == 1


def test_skips_that_are_not_in_a_row_do_not_stop_the_run(prompt_file, tmp_path):
    cli = main(
        _fit_args(
            prompt_file,
            tmp_path,
            **{
                "--model.rewards": _fault_reward(nan_at_calls=[0, 2]),
                "--model.max_iterations": "4",
                "--model.faults.max_consecutive_nonfinite": "2",
            },
        )
    )
    assert cli.model.num_iterations == 4 and cli.model.num_skipped_updates == 2


def test_nan_loss_in_the_middle_of_an_update_skips_it_before_the_optimizer_step(
    prompt_file, tmp_path, monkeypatch
):
    import guardrl.update

    cli = main(_fit_args(prompt_file, tmp_path, **{"--model.max_iterations": "2"})[1:], run=False)
    model = cli.model
    original = guardrl.update.step_loss
    calls = {"n": 0}

    def loss_with_a_nan(*args, **kwargs):
        loss, kl = original(*args, **kwargs)
        calls["n"] += 1
        if model.num_iterations == 1 and calls["n"] == 10:  # iteration 1, second optimizer step's first loss
            loss = loss * float("nan")
        return loss, kl

    monkeypatch.setattr(guardrl.update, "step_loss", loss_with_a_nan)  # the update's per-step loss
    cli.trainer.fit(model, cli.datamodule)
    assert model.num_skipped_updates == 1
    # 4 sampler steps - 1 ODE step = 3 trained steps (3 losses per update); 2 inner epochs of 1 minibatch:
    # iteration 0 takes 2 optimizer steps; iteration 1 takes its first, then the NaN aborts the second.
    assert [v for _, v in _scalars(tmp_path, "train/num_optimizer_steps")] == [2.0, 1.0]
    assert cli.trainer.global_step == 3
    assert _scalars(tmp_path, "train/skipped_update") == [(0, 0.0), (1, 1.0)]
    for p in model.policy.trainable_parameters():
        assert torch.isfinite(p).all() and (p.grad is None or torch.isfinite(p.grad).all())


# ---------------------------------------------------------------- rewards that fail or hang
def test_reward_retries_then_succeeds():
    reward = FaultInjectionReward(raise_at_calls=[0, 1])
    images, prompts = torch.rand(2, 3, 8, 8), ["a", "b"]
    scores = score_with_retries(reward, images, prompts, max_attempts=3, retry_delay_s=0.0)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and reward.calls == 3


def test_reward_that_keeps_failing_raises_reward_error_naming_it():
    reward = FaultInjectionReward(raise_at_calls=[0, 1, 2], name="pickscore")
    with pytest.raises(
        RewardError,
        match=r"reward 'pickscore' failed 2 time\(s\) \(faults.reward_max_attempts=2.*"
        r"attempt 1: ConnectionError: injected failure at call 0; "
        r"attempt 2: ConnectionError: injected failure at call 1",
    ):
        score_with_retries(reward, torch.rand(2, 3, 8, 8), ["a", "b"], max_attempts=2, retry_delay_s=0.0)
    assert reward.calls == 2


class _HangingReward(FaultInjectionReward):
    """Hangs on its first call until released (instead of sleeping a fixed time; at most 60 s, so that code
    that waits for it fails the test instead of hanging it), and records which calls started and which
    finished."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.started, self.finished = [], []

    def score(self, images, prompts):
        call = len(self.started)
        self.started.append(call)
        if call == 0:
            self.release.wait(timeout=60)
        scores = super().score(images, prompts)
        self.finished.append(call)
        return scores


def test_reward_timeout_is_retried_and_bounded():
    # Bounded without a wall clock (which flakes under load): the retry returned while the first call was
    # still hung, so the timeout, not the hung call, ended attempt 1.
    reward = _HangingReward()
    try:
        scores = score_with_retries(
            reward, torch.rand(2, 3, 8, 8), ["a", "b"], max_attempts=2, retry_delay_s=0.0, timeout_s=0.3
        )
        assert torch.isfinite(scores).all() and scores.shape == (2,)
        assert reward.started == [0, 1] and reward.finished == [1]  # call 0 still hangs
    finally:
        reward.release.set()
    reward = _HangingReward()
    try:
        with pytest.raises(RewardError, match=r"attempt 1: TimeoutError: no result within 0.3 s"):
            score_with_retries(reward, torch.rand(2, 3, 8, 8), ["a", "b"], max_attempts=1, timeout_s=0.3)
        assert reward.started == [0] and reward.finished == []
    finally:
        reward.release.set()


def test_a_failing_reward_fails_the_run_instead_of_scoring_zero(prompt_file, tmp_path):
    args = _fit_args(
        prompt_file,
        tmp_path,
        **{
            "--model.rewards": _fault_reward(raise_at_calls=[1, 2]),
            "--model.max_iterations": "3",
            "--model.faults.reward_max_attempts": "2",
        },
    )
    with pytest.raises(RewardError, match="failed 2 time"):
        main(args)
    assert _scalars(tmp_path, "reward/mean")[-1][0] == 0  # nothing was logged for the failed iteration


# ---------------------------------------------------------------- checkpoints
def test_atomic_write_keeps_the_previous_file_when_a_save_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"value": torch.tensor([1.0])}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"value": torch.tensor([2.0]), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.tensor([1.0]))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary left behind


_WRITER = """
import sys, torch
from guardrl.checkpointing import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"n": 0, "payload": torch.zeros(1)}, path)
print("ready", flush=True)
n = 0
while True:
    n += 1
    io.save_checkpoint({"n": n, "payload": torch.full((20_000_000,), float(n))}, path)
"""


@pytest.mark.slow
def test_sigkill_while_writing_never_leaves_a_truncated_checkpoint(tmp_path):
    path = str(tmp_path / "last.ckpt")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    for delay in (0.05, 0.3, 0.7):
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE, text=True, env=env
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.kill()
        process.wait()
        checkpoint = torch.load(path, weights_only=True)  # always a complete file
        assert bool((checkpoint["payload"] == checkpoint["n"]).all())


def test_resuming_with_another_lora_layout_is_refused(prompt_file, tmp_path):
    main(_fit_args(prompt_file, tmp_path, **{"--model.max_iterations": "1"}))
    last = os.path.join(_checkpoints(tmp_path), "last.ckpt")
    args = _fit_args(
        prompt_file,
        tmp_path / "other",
        **{"--model.max_iterations": "2", "--model.lora": '{"rank": 8, "alpha": 8}'},
    )
    with pytest.raises(
        ValueError,
        match=r"ckpt_path: the checkpoint's trainable weights do not fit this model: "
        r"missing 0, unexpected 0, shape-mismatched 32 .*checkpoint \(4, \d+\) vs "
        r"model \(8, \d+\).*model.lora \(rank, target_modules\)",
    ):
        main([*args, "--ckpt_path", last])


def test_ckpt_path_last_without_any_checkpoint_starts_fresh(prompt_file, tmp_path, caplog):
    cli = main([*_fit_args(prompt_file, tmp_path, **{"--model.max_iterations": "1"}), "--ckpt_path", "last"])
    assert cli.model.num_iterations == 1
    assert "no checkpoint at" in caplog.text and "starting a fresh run" in caplog.text


# ---------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_exits_cleanly_and_requeues(prompt_file, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol_args"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    args = _fit_args(
        prompt_file,
        tmp_path,
        **{"--model.max_iterations": "20", "--model.rewards": _fault_reward(sleep_at_calls=[1], sleep_s=5.0)},
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": REPO_ROOT,
        "SLURM_JOB_ID": "4242",
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrl.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pattern = str(tmp_path / "runs" / "guardrl" / "version_*" / "checkpoints" / "iteration=1.ckpt")
    deadline = time.monotonic() + 120
    while not glob.glob(pattern):
        assert process.poll() is None and time.monotonic() < deadline, "the run did not reach iteration 1"
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)  # during iteration 1's slow reward
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "SIGUSR1 received; stopping after iteration 2" in output
    assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "4242"]
    last = torch.load(os.path.join(_checkpoints(tmp_path), "last.ckpt"), weights_only=True)["guardrl"]
    assert last["num_iterations"] == 2


@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERMX", "term"])
def test_uncatchable_or_unknown_signal_names_are_refused(name):
    with pytest.raises(
        ValueError, match=rf"graceful_shutdown.signals: '{name}' is not a signal that can be caught"
    ):
        GracefulShutdown(signals=[name])
