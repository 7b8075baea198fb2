"""Exact resume (docs/reliability.md): N iterations straight through against k iterations, a kill of the
real `guardrl fit` process (SIGKILL, and separately SIGTERM), and `--ckpt_path last` back to N, give
bitwise-identical LoRA weights, optimizer and scheduler state, counters and logged rewards.

The run exercises every piece of state: a stochastic reward drawing from the global torch, numpy and Python
generators, a shuffled prompt stream, an lr schedule, several optimizer steps per iteration, and the
old-policy snapshot."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, tiny_fit_args

TOTAL_ITERATIONS = 5


def _args(prompt_file: str, log_root: str) -> list[str]:
    return tiny_fit_args(
        prompt_file,
        log_root,
        **{
            "--model.max_iterations": str(TOTAL_ITERATIONS),
            "--model.lr_scheduler": '{"class_path": "torch.optim.lr_scheduler.ExponentialLR", '
            '"init_args": {"gamma": 0.7}}',
            "--model.grpo.minibatch_size": "2",
            "--data.shuffle_buffer_size": "3",
            "--checkpoint.every_n_iterations": "1",
            "--checkpoint.save_top_k": "-1",
            # A slow reward call in iteration 3 of the first process: a window to send the signal in.
            "--model.rewards": '[{"class_path": "guardrl.rewards.FaultInjectionReward", '
            '"init_args": {"sleep_at_calls": [2], "sleep_s": 6.0, "noise_std": 0.5, "name": "jpeg"}}]',
            "--seed_everything": "7",
        },
    )


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    return subprocess.Popen(
        [sys.executable, "-m", "guardrl.cli", "fit", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def _run(args: list[str]) -> str:
    process = _start(args)
    output = _finish(process)
    assert process.returncode == 0, output[-3000:]
    return output


def _version_dir(log_root: str) -> str:
    (version_dir,) = glob.glob(os.path.join(log_root, "guardrl", "version_*"))
    return version_dir


def _wait_for(path_pattern: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not glob.glob(path_pattern):
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended before {path_pattern} appeared:\n{process.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path_pattern} did not appear within {timeout} s")
        time.sleep(0.1)


def _rewards_by_iteration(version_dir: str) -> dict[int, float]:
    accumulator = EventAccumulator(version_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    points = accumulator.Scalars("reward/mean")
    steps = [p.step for p in points]
    # One value per iteration: the events the killed run wrote after its checkpoint were purged.
    assert steps == sorted(set(steps)), steps
    return {p.step: p.value for p in points}


def _assert_same_state(straight: dict, resumed: dict) -> None:
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    (opt_a,), (opt_b,) = straight["optimizer_states"], resumed["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    assert straight["global_step"] == resumed["global_step"] == TOTAL_ITERATIONS * 4
    counters_a = {k: v for k, v in straight["guardrl"].items() if k != "rng"}
    counters_b = {k: v for k, v in resumed["guardrl"].items() if k != "rng"}
    assert counters_a == counters_b and counters_a["num_iterations"] == TOTAL_ITERATIONS
    assert torch.equal(straight["guardrl"]["rng"][0]["torch"], resumed["guardrl"]["rng"][0]["torch"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    prompt_dir = tmp_path_factory.mktemp("prompts")
    prompt_file = prompt_dir / "prompts.txt"
    prompt_file.write_text("\n".join(f"prompt number {i}" for i in range(7)) + "\n")
    log_root = str(tmp_path_factory.mktemp("straight"))
    _run(_args(str(prompt_file), log_root))
    version_dir = _version_dir(log_root)
    checkpoint = torch.load(os.path.join(version_dir, "checkpoints", "last.ckpt"), weights_only=True)
    return str(prompt_file), checkpoint, _rewards_by_iteration(version_dir)


@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_and_resumed_run_equals_the_straight_run(straight_run, tmp_path, kill_signal):
    prompt_file, straight, straight_rewards = straight_run
    log_root = str(tmp_path / "runs")
    args = _args(prompt_file, log_root)

    process = _start(args)
    _wait_for(os.path.join(log_root, "guardrl", "version_*", "checkpoints", "iteration=2.ckpt"), process)
    process.send_signal(kill_signal)
    output = _finish(process)
    checkpoints = os.path.join(_version_dir(log_root), "checkpoints")
    interrupted = torch.load(os.path.join(checkpoints, "last.ckpt"), weights_only=True)["guardrl"][
        "num_iterations"
    ]
    if kill_signal == signal.SIGTERM:
        # Clean exit after finishing the iteration in flight (iteration 3, slowed by the reward), checkpointed.
        assert process.returncode == 0, output[-3000:]
        assert "SIGTERM received; stopping after iteration 3" in output
        assert interrupted == 3
    else:
        assert process.returncode == -signal.SIGKILL
        # last.ckpt is written just after iteration=2.ckpt: a kill in between leaves it at iteration 1.
        assert 1 <= interrupted < TOTAL_ITERATIONS
    # Nothing half-written is named like a checkpoint: only complete *.ckpt files, or hidden temporaries
    # that a SIGKILL may leave behind mid-write.
    for name in os.listdir(checkpoints):
        assert (name.endswith(".ckpt") and not name.startswith(".")) or (
            kill_signal == signal.SIGKILL and name.startswith(".") and ".ckpt.tmp-" in name
        ), name

    output = _run([*args, "--ckpt_path", "last"])
    assert "--ckpt_path last resolved to" in output
    (version_dir,) = glob.glob(os.path.join(log_root, "guardrl", "version_*"))  # resumed in place
    resumed = torch.load(os.path.join(version_dir, "checkpoints", "last.ckpt"), weights_only=True)
    _assert_same_state(straight, resumed)
    assert _rewards_by_iteration(version_dir) == straight_rewards
    assert sorted(straight_rewards) == list(range(TOTAL_ITERATIONS))
