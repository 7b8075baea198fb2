"""The end-of-run summary (RunSummaryCallback) and a finished run resumed with the same budget."""

from __future__ import annotations

import glob
import hashlib
import os

import pytest
from conftest import tiny_fit_args

from guardrl.callbacks.run_summary import end_summary_lines
from guardrl.cli import main


def test_end_summary_numbers_and_commands():
    history = [(i, float(i + 1), 0.1) for i in range(6)]  # rewards 1..6
    lines = end_summary_lines(
        history,
        status="finished",
        num_iterations=6,
        max_iterations=6,
        session_iterations=6,
        session_seconds=12.0,
        optimizer_steps=24,
        skipped_updates=1,
        last_checkpoint="runs/x/version_0/c/last.ckpt",
        log_dir="runs/x/version_0",
        window=2,
    )
    text = "\n".join(lines)
    assert lines[0] == "guardrl: finished at iteration 6 of 6 (6 this session, 12 s)"
    # first two: 1, 2 -> 1.5 +- 0.7071 (sample std); last two: 5, 6 -> 5.5 +- 0.7071
    assert "1.5 ± 0.71 over the first 2 iteration(s) -> 5.5 ± 0.71 over the last 2 (change +4)" in text
    assert "24 optimizer step(s); 1 iteration(s) skipped" in text
    assert "--ckpt_path runs/x/version_0/c/last.ckpt --model.max_iterations 12" in text
    assert (
        "python -m guardrl.export --config runs/x/version_0/config.yaml --ckpt runs/x/version_0/c/last.ckpt"
        in text
    )
    assert "tensorboard --logdir runs/x" in text
    assert "WARNING" not in text


def test_end_summary_warns_when_nothing_was_updated():
    lines = end_summary_lines(
        [(0, 1.0, 0.0), (1, 1.0, 0.0)],
        status="finished",
        num_iterations=2,
        max_iterations=2,
        session_iterations=2,
        session_seconds=1.0,
        optimizer_steps=0,
        skipped_updates=2,
        last_checkpoint=None,
        log_dir=None,
        window=5,
    )
    assert any("WARNING: no optimizer step was taken" in line for line in lines)
    assert any("no checkpoint was written" in line for line in lines)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.timeout(300)
def test_fit_prints_summary_and_a_finished_run_is_not_extended(prompt_file, tmp_path, capsys):
    log_root = str(tmp_path / "runs")
    cli = main(
        [
            "fit",
            *tiny_fit_args(
                prompt_file, log_root, **{"--model.max_iterations": "3", "--run_summary.window": "1"}
            ),
        ]
    )
    out = capsys.readouterr().out
    assert cli.model.num_iterations == 3
    assert "guardrl: finished at iteration 3 of 3 (3 this session" in out
    assert "reward/mean:" in out and "over the first 1 iteration(s)" in out
    steps = cli.trainer.global_step
    assert f"updates: {steps} optimizer step(s); 0 iteration(s) skipped" in out
    last = glob.glob(os.path.join(log_root, "*", "version_0", "checkpoints", "last.ckpt"))
    assert len(last) == 1 and f"last checkpoint: {last[0]}" in out
    before = _sha(last[0])
    checkpoints = sorted(os.listdir(os.path.dirname(last[0])))

    # Resumed with the same max_iterations (what a requeue wrapper does): no iteration, no write, a clean
    # exit.
    again = main(
        [
            "fit",
            *tiny_fit_args(
                prompt_file,
                log_root,
                **{"--model.max_iterations": "3", "--run_summary.window": "1", "--ckpt_path": "last"},
            ),
        ]
    )
    out = capsys.readouterr().out
    assert again.model.num_iterations == 3
    assert again.trainer.global_step == steps
    assert "guardrl: run already complete, nothing trained at iteration 3 of 3 (0 this session" in out
    assert _sha(last[0]) == before
    assert sorted(os.listdir(os.path.dirname(last[0]))) == checkpoints

    # Extended: one more iteration; the summary's start window is still the run's first iteration.
    first_line = next(line for line in out.splitlines() if "reward/mean:" in line)
    more = main(
        [
            "fit",
            *tiny_fit_args(
                prompt_file,
                log_root,
                **{"--model.max_iterations": "4", "--run_summary.window": "1", "--ckpt_path": "last"},
            ),
        ]
    )
    out = capsys.readouterr().out
    assert more.model.num_iterations == 4
    assert "finished at iteration 4 of 4 (1 this session" in out
    summary = next(line for line in out.splitlines() if "reward/mean:" in line)
    assert summary.split("->")[0] == first_line.split("->")[0]
    assert _sha(last[0]) != before
