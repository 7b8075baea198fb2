"""Runs that cannot be lost or hijacked: a saved config.yaml describes its run without binding the next one to
it, and a new run never writes into another run's folder (docs/reliability.md)."""

from __future__ import annotations

import glob
import hashlib
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO_ROOT, tiny_fit_args
from test_resume import _start, _wait_for

from guardrl.cli import main


def _fingerprint(folder: str) -> dict[str, str]:
    """Every file under `folder` with its content hash."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def _fit(prompt_file: str, log_root: str, **overrides):
    return main(["fit", *tiny_fit_args(prompt_file, log_root, **overrides)])


@pytest.mark.timeout(300)
def test_a_saved_config_starts_a_new_run_and_touches_nothing_of_the_old(prompt_file, tmp_path):
    log_root = str(tmp_path / "runs")
    _fit(prompt_file, log_root, **{"--model.max_iterations": "2"})
    _fit(prompt_file, log_root, **{"--model.max_iterations": "3", "--ckpt_path": "last"})  # resumed once
    old = os.path.join(log_root, "guardrl", "version_0")
    saved = os.path.join(old, "config.yaml")
    with open(saved) as f:
        config = yaml.safe_load(f)
    # The saved config describes the run; nothing in it points the next fit at this folder or checkpoint.
    assert config["ckpt_path"] is None
    assert config["trainer"]["logger"]["init_args"]["version"] is None
    assert config["trainer"]["logger"]["init_args"].get("purge_step") is None
    assert config["model"]["max_iterations"] == 3
    before = _fingerprint(old)

    # "Same config, new lr": a new run in version_1; the old run's every file is unchanged.
    cli = main(
        ["fit", "--config", saved, "--model.optimizer.init_args.lr", "0.02", "--model.max_iterations", "1"]
    )
    assert cli.model.num_iterations == 1
    assert cli.trainer.log_dir == os.path.join(log_root, "guardrl", "version_1")
    assert _fingerprint(old) == before


def test_a_new_run_into_a_taken_version_folder_is_refused(prompt_file, tmp_path):
    log_root = str(tmp_path / "runs")
    _fit(prompt_file, log_root, **{"--model.max_iterations": "1"})
    old = os.path.join(log_root, "guardrl", "version_0")
    before = _fingerprint(old)
    with pytest.raises(
        ValueError,
        match=r"trainer.logger.init_args.version=0: .*version_0 holds another run "
        r"\(config.yaml, checkpoints\).*--ckpt_path last",
    ):
        _fit(prompt_file, log_root, **{"--trainer.logger.init_args.version": "0"})
    assert _fingerprint(old) == before


@pytest.mark.timeout(300)
def test_a_resume_with_changed_options_keeps_the_previous_config(prompt_file, tmp_path):
    log_root = str(tmp_path / "runs")
    _fit(prompt_file, log_root, **{"--model.max_iterations": "1"})
    folder = os.path.join(log_root, "guardrl", "version_0")
    with open(os.path.join(folder, "config.yaml")) as f:
        first = f.read()
    _fit(prompt_file, log_root, **{"--model.max_iterations": "2", "--ckpt_path": "last"})
    with open(os.path.join(folder, "config.1.yaml")) as f:
        assert f.read() == first
    with open(os.path.join(folder, "config.yaml")) as f:
        assert yaml.safe_load(f)["model"]["max_iterations"] == 2
    # A resume with identical options adds no copy.
    _fit(prompt_file, log_root, **{"--model.max_iterations": "2", "--ckpt_path": "last"})
    assert not os.path.exists(os.path.join(folder, "config.2.yaml"))


# ---------------------------------------------------------------------------------------------- Ctrl-C
def _slow_run_args(prompt_file: str, log_root: str) -> list[str]:
    """5 iterations, a checkpoint every 2; the reward's third call (iteration 2, 0-based) sleeps 6 s: the
    window in which the tests press Ctrl-C."""
    return tiny_fit_args(
        prompt_file,
        log_root,
        **{
            "--model.max_iterations": "5",
            "--checkpoint.every_n_iterations": "2",
            "--model.rewards": '[{"class_path": "guardrl.rewards.FaultInjectionReward", '
            '"init_args": {"sleep_at_calls": [2], "sleep_s": 6.0, "name": "jpeg"}}]',
        },
    )


def _iterations_in(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["guardrl"]["num_iterations"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_finishes_the_iteration_saves_and_exits_cleanly(prompt_file, tmp_path):
    log_root = str(tmp_path / "runs")
    process = _start(_slow_run_args(prompt_file, log_root))
    checkpoints = os.path.join(log_root, "guardrl", "version_0", "checkpoints")
    _wait_for(os.path.join(checkpoints, "iteration=2.ckpt"), process)
    process.send_signal(signal.SIGINT)  # during iteration 2's slow reward
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    assert "SIGINT received; finishing this iteration" in output
    assert "SIGINT received; stopping after iteration 3, checkpoint saved to" in output
    assert "guardrl: stopped by SIGINT at iteration 3 of 5" in output
    # Not a multiple of every_n_iterations: without the handler, iteration 3 would be lost.
    assert _iterations_in(os.path.join(checkpoints, "last.ckpt")) == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_ctrl_c_aborts_at_once_without_saving(prompt_file, tmp_path):
    log_root = str(tmp_path / "runs")
    process = _start(_slow_run_args(prompt_file, log_root))
    checkpoints = os.path.join(log_root, "guardrl", "version_0", "checkpoints")
    _wait_for(os.path.join(checkpoints, "iteration=2.ckpt"), process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    assert "guardrl: interrupted (KeyboardInterrupt) at iteration 2 of 5" in output
    # The slow reward (6 s) was cut short; generous bound for a loaded machine, far below finishing the run.
    assert time.monotonic() - sent < 30
    assert _iterations_in(os.path.join(checkpoints, "last.ckpt")) == 2


def test_time_based_checkpoint_cadence(prompt_file, tmp_path):
    log_root = str(tmp_path / "runs")
    _fit(
        prompt_file,
        log_root,
        **{
            "--model.max_iterations": "3",
            "--checkpoint.every_n_iterations": "100",
            "--checkpoint.save_top_k": "-1",
            "--checkpoint.every_n_minutes": "1e-9",
        },
    )
    names = sorted(os.listdir(os.path.join(log_root, "guardrl", "version_0", "checkpoints")))
    # every iteration ends more than 1e-9 minutes after the last save
    assert names == ["iteration=1.ckpt", "iteration=2.ckpt", "iteration=3.ckpt", "last.ckpt"]
    with pytest.raises(ValueError, match=r"checkpoint.every_n_minutes must be a number > 0 or null, got 0"):
        _fit(prompt_file, str(tmp_path / "other"), **{"--checkpoint.every_n_minutes": "0"})


# ---------------------------------------------------------------------------------------------- data problems
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from guardrl.data.prompts import iter_prompt_file

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffa red circle\n\ufeffa blue square\n".encode("utf-8"))
    # Only a file's first bytes can be a byte-order mark; one later in the file is kept as text.
    assert list(iter_prompt_file(str(path))) == ["a red circle", "\ufeffa blue square"]


def test_reward_weights_of_zero_warn_and_all_zero_is_refused():
    from guardrl.checks import check_rewards
    from guardrl.rewards import JpegCompressibility

    with pytest.warns(
        UserWarning,
        match=r"'quiet' has weight 0: it is scored and logged \(reward/quiet/mean\) but "
        r"does not enter the total",
    ):
        check_rewards([JpegCompressibility(), JpegCompressibility(weight=0, name="quiet")])
    with pytest.raises(ValueError, match=r"every reward has weight 0 \(jpeg_compressibility\)"):
        check_rewards([JpegCompressibility(weight=0.0)])


@pytest.mark.timeout(300)
def test_a_group_with_a_nan_reward_is_dropped_and_the_others_train(prompt_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reward = (
        '[{"class_path": "guardrl.rewards.FaultInjectionReward", '
        '"init_args": {"nan_at_calls": [1], "nan_samples": [0]}}]'
    )
    cli = _fit(
        prompt_file,
        str(tmp_path / "runs"),
        **{"--model.rewards": reward, "--model.max_iterations": "2", "--model.grpo.num_inner_epochs": "1"},
    )
    model = cli.model
    # Iteration 1's first group (samples 0, 1) had a NaN; its second group trained: no skipped update.
    assert model.num_iterations == 2 and model.num_skipped_updates == 0
    (version,) = glob.glob(str(tmp_path / "runs" / "guardrl" / "version_*"))
    events = EventAccumulator(version, size_guidance={"scalars": 0})
    events.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("train/dropped_groups") == [(0, 0.0), (1, 1.0)]
    assert scalars("train/skipped_update") == [(0, 0.0), (1, 0.0)]
    assert [v for _, v in scalars("train/num_optimizer_steps")] == [1.0, 1.0]
    # Groups of two samples have advantages of about +-1; with one of the two groups zeroed, the mean |A|
    # halves.
    abs_mean = dict(scalars("advantages/abs_mean"))
    assert abs_mean[0] == pytest.approx(1.0, abs=0.01) and abs_mean[1] == pytest.approx(0.5, abs=0.01)
    # reward/mean is over the finite rewards (here the 3 of 4 that are not NaN)
    assert all(math.isfinite(v) for _, v in scalars("reward/mean"))


# ---------------------------------------------------------------------------------------------- papercuts
def test_checkpoints_are_readable_like_the_runs_other_files(prompt_file, tmp_path):
    from guardrl.checkpointing import default_file_mode

    previous = os.umask(0o022)
    try:
        _fit(prompt_file, str(tmp_path / "runs"), **{"--model.max_iterations": "1"})
    finally:
        os.umask(previous)
    folder = os.path.join(str(tmp_path / "runs"), "guardrl", "version_0")
    assert default_file_mode() == 0o666 & ~previous
    modes = {
        name: os.stat(os.path.join(folder, "checkpoints", name)).st_mode & 0o777
        for name in os.listdir(os.path.join(folder, "checkpoints"))
    }
    assert modes == {"iteration=1.ckpt": 0o644, "last.ckpt": 0o644}
    assert os.stat(os.path.join(folder, "config.yaml")).st_mode & 0o777 == 0o644


def test_guardrl_version():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv = ['guardrl', '--version']; "
            "from guardrl.console import console_main; console_main()",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("guardrl 0.1.0 (torch ")


# ------------------------------------------------------------------------------------ errors people read
def _guardrl(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    env.pop("GUARDRL_DEBUG", None)
    if debug:
        env["GUARDRL_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "guardrl.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_user_error_is_a_short_message_and_debug_shows_the_traceback():
    args = ("fit", "--config", "configs/tiny/grpo_guard.yaml", "--model.grpo.clip_range", ".nan")
    result = _guardrl(*args)
    assert result.returncode == 1
    assert "guardrl: error: grpo.clip_range must be a finite number > 0, got nan" in result.stderr
    assert "GUARDRL_DEBUG=1 shows the traceback" in result.stderr
    assert "Traceback" not in result.stderr
    debug = _guardrl(*args, debug=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_misspelt_option_prints_no_wall_of_usage():
    # Found by guardrl.preflight before the heavy imports (tests/test_preflight.py)...
    result = _guardrl("fit", "--config", "configs/tiny/grpo_guard.yaml", "--model.grpo.clip_rnge", "1e-4")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(
        "guardrl fit: error: option 'model.grpo.clip_rnge' (command line) does not exist"
    )
    assert "did you mean 'model.grpo.clip_range'" in lines[-1]
    assert len(lines) == 2, lines  # usage line and error (was 128 lines with every option's usage)
    # ... and below a class_path, where only the full parser knows the options: still a few lines.
    result = _guardrl(
        "fit", "--config", "configs/tiny/grpo_guard.yaml", "--model.backbone.init_args.resolutoin", "32"
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[transformers]")]
    assert "Option 'resolutoin' is not accepted" in result.stderr
    assert len(lines) <= 6, lines


def test_a_huge_prompt_is_reported_once_not_echoed(tiny_sd3, caplog):
    import logging

    huge = "a red circle " * 20_000  # about 260 kB, far past CLIP's 77 tokens and T5's max_sequence_length
    with caplog.at_level(logging.WARNING):
        tiny_sd3.encode_prompts([huge, huge + "x", "a blue square"], with_negative=False)
        tiny_sd3.encode_prompts([huge + "y"], with_negative=False)
    assert tiny_sd3.truncated_prompts == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("was truncated; said once per run" in m for m in messages) == 1
    assert not any("The following part of your input was truncated" in m for m in messages)
    assert sum(len(m) for m in messages) < 2_000  # no cut-off text echoed into the log


def test_importing_guardrl_prints_no_intended_third_party_warnings():
    # transformers' "requires torchvision (not installed); falling back to ...ImageProcessorPil", at every
    # start
    result = subprocess.run(
        [sys.executable, "-c", "import guardrl.policy, guardrl.rewards"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "falling back to" not in result.stderr, result.stderr


def test_only_fit_and_validate_are_offered(prompt_file, tmp_path, capsys):
    # GRPOModule has no test or predict step: offering them would fail deep inside Lightning
    with pytest.raises(SystemExit) as raised:
        main(["test", *tiny_fit_args(prompt_file, str(tmp_path / "runs"))])
    assert raised.value.code == 2
    assert "invalid choice: 'test' (choose from 'fit', 'validate')" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_an_unwritable_log_directory_is_one_line():
    # /sys refuses new directories even to root (EPERM), like an unwritable or read-only log directory would.
    result = _guardrl(
        "fit",
        "--config",
        "configs/tiny/grpo_guard.yaml",
        "--model.max_iterations",
        "1",
        "--trainer.logger.init_args.save_dir",
        "/sys/guardrl_runs",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "guardrl: error: [Errno 1] Operation not permitted: '/sys/guardrl_runs" in result.stderr
    assert "Traceback" not in result.stderr
