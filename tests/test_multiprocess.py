"""Two processes on CPU (DDP over gloo), through the real `guardrl fit` command: every callback that touches
the trainer's collectives runs, and the run ends (a rank-zero-only call to `Trainer.log_dir`, which
broadcasts, used to leave rank zero waiting forever in RunSummaryCallback and LoraExport)."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_two_process_ddp_run_finishes_with_every_rank_sensitive_callback(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "guardrl.cli",
        "fit",
        "--config",
        "configs/tiny/grpo_guard.yaml",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--model.max_iterations",
        "2",
        "--data.prompts_per_batch",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.callbacks+=guardrl.callbacks.LoraExport",
    ]
    # A deadlock shows up as the timeout, not as a hung test suite.
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    version_dir = str(tmp_path / "tiny_grpo_guard" / "version_0")
    assert output.count(f"logs: {version_dir}") == 1  # the console summary comes from rank zero only
    assert "2 rank(s)" in output
    checkpoint = torch.load(os.path.join(version_dir, "checkpoints", "last.ckpt"), weights_only=True)
    assert checkpoint["guardrl"]["num_iterations"] == 2
    assert len(checkpoint["guardrl"]["rng"]) == 2  # one RNG state per rank
    assert glob.glob(os.path.join(version_dir, "lora", "final", "pytorch_lora_weights.safetensors"))
