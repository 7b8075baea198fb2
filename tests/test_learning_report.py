"""The learning benchmark's arithmetic (guardrl/toy/learning.py) on hand-made runs, and its quick mode end to
end."""

from __future__ import annotations

import json
import os

import pytest

from guardrl.toy.learning import gain, gains_table, main, smooth, table_markdown
from guardrl.toy.rewards import prompt_color_share


def _run(variant: str, seed: int, start: float, end: float, train: list[float]) -> dict:
    curve = [
        {
            "iteration": i,
            "reward_mean": r,
            "reward_std": 0.1,
            "grad_norm": 0.01,
            "clip_share": 0.05,
            "skipped": 0.0,
            "seconds": 2.0,
        }
        for i, r in enumerate(train)
    ]
    evaluations = [
        {"iteration": 0, "reward_mean": start, "reward_std": 0.1, "images": 8},
        {"iteration": len(train), "reward_mean": end, "reward_std": 0.1, "images": 8},
    ]
    return {
        "reward": "jpeg",
        "variant": variant,
        "seed": seed,
        "lr": 3e-3,
        "settings": {"window": 2},
        "curve": curve,
        "evaluations": evaluations,
    }


def test_gains_table_on_hand_numbers():
    runs = [
        _run("null_control", 0, 1.0, 1.1, [1, 1, 1, 1]),
        _run("null_control", 1, 1.0, 0.9, [1, 1, 1, 1]),
        _run("null_control", 2, 1.0, 1.0, [1, 1, 1, 1]),
        _run("flow_grpo", 0, 1.0, 2.0, [1, 2, 3, 4]),
        _run("flow_grpo", 1, 1.0, 1.6, [1, 1, 2, 2]),
        _run("flow_grpo", 2, 1.0, 1.8, [1, 1, 1, 1]),
        _run("grpo_guard", 0, 1.0, 1.12, [1, 1, 1, 1]),
        _run("grpo_guard", 1, 1.0, 1.0, [1, 1, 1, 1]),
        _run("grpo_guard", 2, 1.0, 1.2, [1, 1, 1, 1]),
    ]
    rows = {r["variant"]: r for r in gains_table(runs)}
    null, flow, guard = rows["null_control"], rows["flow_grpo"], rows["grpo_guard"]
    # null gains 0.1, -0.1, 0.0: mean 0, sample std 0.1
    assert null["gain_mean"] == pytest.approx(0.0, abs=1e-12) and null["gain_std"] == pytest.approx(0.1)
    # flow gains 1.0, 0.6, 0.8: mean 0.8, std 0.2; (0.8 - 0) / 0.1 = 8 null SDs; every seed above 0.1
    assert flow["gain_mean"] == pytest.approx(0.8) and flow["gain_std"] == pytest.approx(0.2)
    assert flow["null_sds"] == pytest.approx(8.0)
    assert flow["above_every_null_seed"] and flow["passes"]
    # paired with the null of the same seed: 0.9, 0.7, 0.8
    assert flow["paired_mean"] == pytest.approx(0.8) and flow["paired_std"] == pytest.approx(0.1)
    # training-reward gains over windows of 2: (3.5 - 1.5), (2 - 1), (1 - 1) -> mean 1.0
    assert flow["train_gain_mean"] == pytest.approx(1.0)
    # guard gains 0.12, 0.0, 0.2: 0.0 is not above the null's best seed (0.1): does not pass
    assert guard["gain_mean"] == pytest.approx(0.32 / 3)
    assert not guard["above_every_null_seed"] and not guard["passes"]
    table = table_markdown(gains_table(runs))
    assert "| flow_grpo | 1 | 0.8 ± 0.2 (3) | 1, 0.6, 0.8 |" in table
    assert "**no**" in table and "**yes**" in table


def test_gain_and_smooth():
    assert gain([{"iteration": i, "reward_mean": float(i)} for i in range(6)], 2) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no two disjoint windows of 3"):
        gain([{"iteration": i, "reward_mean": 0.0} for i in range(5)], 3)
    assert smooth([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def test_color_share_counts_only_the_prompts_colours():
    import torch

    image = torch.zeros(1, 3, 4, 4)
    image[0, 0, :2, :] = 1.0  # 8 red pixels
    image[0, 2, 3, :] = 1.0  # 4 blue pixels
    image[0, :, 2, 0] = 0.5  # 1 grey pixel: off-palette, never counted
    assert prompt_color_share(image, ["a red circle"]).tolist() == [0.5]
    assert prompt_color_share(image, ["a red circle and a blue square"]).tolist() == [0.75]
    assert prompt_color_share(image, ["a green triangle"]).tolist() == [0.0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_mode_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "learning")
    argv = [
        "--out",
        out,
        "--quick",
        "--seeds",
        "0",
        "--variants",
        "flow_grpo,null_control",
        "--rewards",
        "jpeg",
    ]
    main(argv)
    printed = capsys.readouterr().out
    assert "### jpeg, lr 0.003 (evaluation: 4 images)" in printed
    for name in ("table.md", "gains.csv", "curves.png", "summary.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["runs"] == 2
    # A repeated command skips the finished runs (done.json) and reports again.
    main(argv)
    assert "2 runs in" in capsys.readouterr().out
