"""Exact resume (docs/reliability.md): N iterations straight through against k iterations, a kill of the
real `guardrl fit` process (SIGKILL, and separately SIGTERM), and `--ckpt_path last` back to N, give
bitwise-identical LoRA weights, optimizer and scheduler state, counters and logged rewards.

The run exercises every piece of state: a stochastic reward drawing from the global torch, numpy and Python
generators, a shuffled prompt stream, an lr schedule, several optimizer steps per iteration, and the
old-policy snapshot."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT, tiny_fit_args
from guardrl.rewards import FaultInjectionReward

TOTAL_ITERATIONS = 5


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


class GatedReward(FaultInjectionReward):
    """FaultInjectionReward (stochastic with noise_std > 0) whose call `gate_call` (0-based, per process)
    first creates the file `started`, then waits until the file `release` exists (at most 600 s). A test
    signals the run while that call is in flight, then releases it: an ordering, not a timing window that a
    loaded machine can miss. Draws no random numbers of its own, so a gated run scores like an ungated one."""

    def __init__(
        self, gate_call: int, started: str, release: str, noise_std: float = 0.0, name: Optional[str] = None
    ) -> None:
        super().__init__(noise_std=noise_std, name=name)
        self.gate_call, self.started, self.release = gate_call, started, release

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.calls == self.gate_call:  # FaultInjectionReward.score counts the call
            open(self.started, "w").close()
            deadline = time.monotonic() + 600
            while not os.path.exists(self.release):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"GatedReward: {self.release} did not appear within 600 s")
                time.sleep(0.05)
        return super().score(images, prompts)


def _args(prompt_file: str, log_root: str, gate_dir: str) -> list[str]:
    # The reward's call 2 (iteration 3 of a process) waits for `gate_dir/release`, after creating
    # `gate_dir/started`. (Resumed processes count their calls from 0 again; the gate is open by then.)
    gate = {
        "gate_call": 2,
        "started": os.path.join(gate_dir, "started"),
        "release": os.path.join(gate_dir, "release"),
        "noise_std": 0.5,
        "name": "jpeg",
    }
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
            "--model.rewards": json.dumps([{"class_path": "test_resume.GatedReward", "init_args": gate}]),
            "--seed_everything": "7",
        },
    )


def _open_gate(gate_dir: str) -> None:
    open(os.path.join(gate_dir, "release"), "w").close()


def _start(args: list[str]) -> subprocess.Popen:
    # tests/ is on the path so that a run can use a reward defined here (GatedReward)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, TESTS_DIR]),
    }
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
    gate_dir = str(tmp_path_factory.mktemp("gate"))
    _open_gate(gate_dir)  # never held: the straight run only shares the reward's scores
    _run(_args(str(prompt_file), log_root, gate_dir))
    version_dir = _version_dir(log_root)
    checkpoint = torch.load(os.path.join(version_dir, "checkpoints", "last.ckpt"), weights_only=True)
    return str(prompt_file), checkpoint, _rewards_by_iteration(version_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_and_resumed_run_equals_the_straight_run(straight_run, tmp_path, kill_signal):
    prompt_file, straight, straight_rewards = straight_run
    log_root, gate_dir = str(tmp_path / "runs"), str(tmp_path / "gate")
    os.makedirs(gate_dir)
    args = _args(prompt_file, log_root, gate_dir)

    process = _start(args)
    # Iteration 3's reward call is in flight (iterations 1 and 2 are done and checkpointed) and held there
    # until the gate opens: the signal arrives mid-iteration however slow the machine is.
    _wait_for(os.path.join(gate_dir, "started"), process)
    process.send_signal(kill_signal)
    if kill_signal == signal.SIGTERM:
        _open_gate(gate_dir)  # SIGTERM lets the iteration in flight finish
    output = _finish(process)
    _open_gate(gate_dir)  # (after a SIGKILL: for the resumed run, whose call 2 is iteration 4 or 5)
    checkpoints = os.path.join(_version_dir(log_root), "checkpoints")
    interrupted = torch.load(os.path.join(checkpoints, "last.ckpt"), weights_only=True)["guardrl"][
        "num_iterations"
    ]
    if kill_signal == signal.SIGTERM:
        # Clean exit after finishing the iteration in flight (iteration 3), checkpointed.
        assert process.returncode == 0, output[-3000:]
        assert "SIGTERM received; stopping after iteration 3" in output
        assert interrupted == 3
    else:
        assert process.returncode == -signal.SIGKILL
        # killed inside iteration 3: last.ckpt is iteration 2's, written before iteration 3 began
        assert interrupted == 2
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
