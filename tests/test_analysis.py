"""guardrl.analysis on the logs of fresh tiny runs (flow_grpo and grpo_guard, 3 iterations each) and on
hand-written event files (resumed steps, gold metrics, version folders)."""

import os
import time

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from guardrl import analysis  # noqa: E402
from guardrl.cli import main  # noqa: E402
from tests.conftest import tiny_fit_args  # noqa: E402

VARIANTS = ("flow_grpo", "grpo_guard")
ITERATIONS = 3
STEPS = [0, 1, 2]  # 4 sampler steps: the SDE steps 0..2 are trained, the last (Euler) step never is
SAMPLES_PER_UPDATE_SET = 8  # 2 inner epochs x (2 prompts x 2 samples): every histogram pools 8 log-ratios


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """{variant: runs/<variant>} of two fresh 3-iteration tiny runs. test_notebooks.py imports this
    fixture; the runs live in the session's base temp folder so both modules read the same ones."""
    root = tmp_path_factory.getbasetemp() / "tiny_runs"
    runs = {variant: root / variant for variant in VARIANTS}
    if not (root / "done").exists():
        prompts = root / "prompts.txt"
        root.mkdir(exist_ok=True)
        prompts.write_text("a red circle\na blue square\na green triangle\ntwo yellow circles\n")
        for variant in VARIANTS:
            main(
                [
                    "fit",
                    *tiny_fit_args(
                        str(prompts),
                        str(root),
                        **{
                            "--model.grpo.ratio_variant": variant,
                            "--model.max_iterations": str(ITERATIONS),
                            "--trainer.logger.init_args.name": variant,
                            "--trainer.enable_checkpointing": "false",
                        },
                    ),
                ]
            )
        (root / "done").touch()
    return runs


# ------------------------------------------------------------------------------------------ frames
def test_load_scalars_reads_every_iteration_once(tiny_runs):
    scalars = analysis.load_scalars(tiny_runs["grpo_guard"])
    assert list(scalars.columns) == ["tag", "step", "value", "wall_time"]
    assert scalars.duplicated(["tag", "step"]).sum() == 0
    reward = scalars[scalars["tag"] == "reward/mean"]
    assert reward["step"].tolist() == [0, 1, 2]
    for k in STEPS:
        assert scalars[scalars["tag"] == f"ratio/mean_t{k}"]["step"].tolist() == [0, 1, 2]
    assert "ratio/mean_t3" not in set(scalars["tag"])
    # The same values TensorBoard holds, read here without the default sampling.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(analysis.resolve_run_dir(tiny_runs["grpo_guard"])), {"scalars": 0})
    accumulator.Reload()
    assert reward["value"].tolist() == [e.value for e in accumulator.Scalars("reward/mean")]
    only = analysis.load_scalars(tiny_runs["grpo_guard"], tags=["reward/std", "no/such_tag"])
    assert set(only["tag"]) == {"reward/std"} and len(only) == ITERATIONS


@pytest.mark.parametrize("variant", VARIANTS)
def test_histogram_moments_match_the_logged_means(tiny_runs, variant):
    hist = analysis.load_ratio_histograms(tiny_runs[variant])
    scalars = analysis.load_scalars(tiny_runs[variant])
    assert len(hist) == 2 * len(STEPS) * ITERATIONS  # (kind, k, iteration)
    assert analysis.trained_steps(tiny_runs[variant]) == STEPS
    for kind in ("log_ratio", "raw_log_ratio"):
        for k in STEPS:
            rows = hist[(hist["kind"] == kind) & (hist["k"] == k)]
            assert rows["step"].tolist() == [0, 1, 2]
            logged = scalars[scalars["tag"] == f"ratio/{kind}_mean_t{k}"]["value"].to_numpy()
            # The scalar is stored as float32; the histogram's sums as float64.
            np.testing.assert_allclose(rows["mean"].to_numpy(), logged, rtol=1e-6, atol=1e-12)
            assert (rows["num"] == SAMPLES_PER_UPDATE_SET).all()
            assert all(counts.sum() == SAMPLES_PER_UPDATE_SET for counts in rows["bucket_counts"])
            assert all(len(lim) == len(c) for lim, c in zip(rows["bucket_limits"], rows["bucket_counts"]))
            assert ((rows["std"] > 0) & (rows["min"] <= rows["mean"]) & (rows["mean"] <= rows["max"])).all()
    same = (
        hist[hist["kind"] == "log_ratio"]["mean"].to_numpy()
        == hist[hist["kind"] == "raw_log_ratio"]["mean"].to_numpy()
    )
    # flow_grpo clips the plain log r itself; grpo_guard clips RatioNorm's -(dmu.eps), a different number.
    assert same.all() if variant == "flow_grpo" else not same.any()


def test_clip_fractions_and_rewards_are_tidy(tiny_runs):
    run = tiny_runs["flow_grpo"]
    clip = analysis.clip_fractions(run)
    assert list(clip.columns) == ["step", "k", "sign", "value"]
    assert len(clip) == len(STEPS) * 2 * ITERATIONS
    assert set(clip["sign"]) == {"pos_upper", "neg_lower"} and sorted(clip["k"].unique()) == STEPS
    assert clip["value"].between(0, 1).all()
    scalars = analysis.load_scalars(run).set_index(["tag", "step"])["value"]
    for row in clip.itertuples():
        assert row.value == scalars[(f"clip/frac_{row.sign}_t{row.k}", row.step)]
    rewards = analysis.rewards(run)
    assert rewards["step"].tolist() == [0, 1, 2]
    assert {"reward/mean", "reward/std", "reward/jpeg_compressibility/mean"} <= set(rewards.columns)
    assert analysis.gold_metrics(run).columns.tolist() == ["step"] and analysis.gold_metrics(run).empty


def test_run_summary_and_compare_table(tiny_runs):
    summary = analysis.run_summary(tiny_runs["grpo_guard"])
    assert summary["k"].tolist() == STEPS and (summary["iterations"] == ITERATIONS).all()
    assert {
        "log_ratio_mean",
        "log_ratio_z",
        "raw_log_ratio_mean",
        "raw_log_ratio_z",
        "frac_pos_upper",
        "frac_neg_lower",
        "pos_over_neg",
    } <= set(summary.columns)
    hist = analysis.load_ratio_histograms(tiny_runs["grpo_guard"])
    k2 = hist[(hist["kind"] == "log_ratio") & (hist["k"] == 2)]
    assert summary.loc[2, "log_ratio_mean"] == pytest.approx(k2["mean"].mean())
    table = analysis.compare_table(tiny_runs)
    assert table["run"].tolist() == ["flow_grpo"] * 3 + ["grpo_guard"] * 3


# ------------------------------------------------------------------------------------ folders and events
def _write_scalars(folder, values, tag="reward/mean"):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step, value in values.items():
        writer.add_scalar(tag, value, step)
    writer.close()
    time.sleep(0.01)  # distinct wall times; event file names carry the second they were opened


def test_a_step_logged_twice_keeps_the_latest_value(tmp_path):
    _write_scalars(tmp_path, {0: 1.0, 1: 2.0, 2: 3.0})
    # A restart without a purge re-logs the last step: TensorBoard keeps both points, we keep the newest.
    _write_scalars(tmp_path, {2: 30.0, 3: 40.0})
    frame = analysis.load_scalars(tmp_path)
    assert frame["step"].tolist() == [0, 1, 2, 3]
    assert frame["value"].tolist() == [1.0, 2.0, 30.0, 40.0]


def test_run_dir_is_a_version_folder_or_its_parent(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        analysis.resolve_run_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        analysis.resolve_run_dir(tmp_path)
    _write_scalars(tmp_path / "version_0", {0: 1.0})
    (tmp_path / "version_9").mkdir()  # no events (a run that died before logging): skipped
    assert analysis.resolve_run_dir(tmp_path) == tmp_path / "version_0"
    _write_scalars(tmp_path / "version_10", {0: 5.0})  # newest = highest number, not the last in name order
    assert analysis.resolve_run_dir(tmp_path) == tmp_path / "version_10"
    assert analysis.load_scalars(tmp_path)["value"].tolist() == [5.0]
    assert analysis.resolve_run_dir(tmp_path / "version_0") == tmp_path / "version_0"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GUARDRL_RUN_DIR", "version_0")
    assert analysis.run_dir_from_env("GUARDRL_RUN_DIR") == tmp_path / "version_0"
    monkeypatch.delenv("GUARDRL_RUN_DIR")
    with pytest.raises(FileNotFoundError, match="set GUARDRL_RUN_DIR"):
        analysis.run_dir_from_env("GUARDRL_RUN_DIR", default="runs/none")
    monkeypatch.setenv("GUARDRL_RUN_DIRS", f"old={tmp_path / 'version_0'}, new=.")
    assert analysis.run_dirs_from_env() == {"old": tmp_path / "version_0", "new": tmp_path / "version_10"}
    monkeypatch.setenv("GUARDRL_RUN_DIRS", "just_a_path")
    with pytest.raises(ValueError, match="label=path"):
        analysis.run_dirs_from_env()


# ------------------------------------------------------------------------------------------ figures
def _panels(fig):
    """{title: [Line2D with data]} of each panel (the dotted zero line has no x data of its own)."""
    return {ax.get_title(): [line for line in ax.get_lines() if len(line.get_xdata()) > 2] for ax in fig.axes}


def test_ratio_distribution_has_one_panel_per_trained_step(tiny_runs):
    for kind in ("log_ratio", "raw_log_ratio"):
        fig = analysis.plot_ratio_distribution(tiny_runs["grpo_guard"], kind=kind)
        panels = _panels(fig)
        assert list(panels) == [f"k = {k}" for k in STEPS]
        hist = analysis.load_ratio_histograms(tiny_runs["grpo_guard"])
        for k in STEPS:
            (mean_line,) = panels[f"k = {k}"]
            expected = hist[(hist["kind"] == kind) & (hist["k"] == k)]["mean"].to_numpy()
            np.testing.assert_allclose(mean_line.get_ydata(), expected)
    png = analysis.to_png(fig)
    assert png.startswith(b"\x89PNG") and fig._repr_png_().startswith(b"\x89PNG")
    assert list(_panels(analysis.plot_ratio_distribution(tiny_runs["grpo_guard"], steps=[2]))) == ["k = 2"]
    with pytest.raises(ValueError, match=r"steps=\[7\] have no"):
        analysis.plot_ratio_distribution(tiny_runs["grpo_guard"], steps=[7])
    with pytest.raises(ValueError, match="kind='ratio'"):
        analysis.plot_ratio_distribution(tiny_runs["grpo_guard"], kind="ratio")
    histograms = analysis.plot_ratio_histograms(tiny_runs["flow_grpo"])
    assert [ax.get_title() for ax in histograms.axes] == [f"k = {k}" for k in STEPS]
    assert all(len(ax.patches) >= 1 for ax in histograms.axes)


def test_clip_and_comparison_figures(tiny_runs):
    clip = _panels(analysis.plot_clip_fractions(tiny_runs["flow_grpo"]))
    assert list(clip) == [f"k = {k}" for k in STEPS]
    assert all(len(lines) == 2 for lines in clip.values())  # one line per advantage sign
    compare = analysis.compare_runs(tiny_runs)
    assert [ax.get_title() for ax in compare.axes] == [f"k = {k}" for k in STEPS]
    assert [t.get_text() for t in compare.axes[0].get_legend().get_texts()] == list(VARIANTS)
    assert all(len(lines) == 2 for lines in _panels(compare).values())  # one line per run
    assert all(len(lines) == 4 for lines in _panels(analysis.compare_runs(tiny_runs, "clip")).values())
    (reward,) = analysis.compare_runs(tiny_runs, "reward").axes
    assert len(reward.get_lines()) == 2
    with pytest.raises(ValueError, match="metric='kl'"):
        analysis.compare_runs(tiny_runs, "kl")


def test_proxy_vs_gold_with_and_without_gold(tiny_runs, tmp_path):
    with pytest.warns(UserWarning, match="no gold metrics in this run"):
        fig = analysis.plot_proxy_vs_gold(tiny_runs["flow_grpo"])
    (ax,) = fig.axes
    assert "no gold metrics" in ax.get_title() and len(ax.get_lines()) == 1
    with pytest.raises(ValueError, match=r"gold_tags \['gold/pass_rate'\] were not logged"):
        analysis.plot_proxy_vs_gold(tiny_runs["flow_grpo"], gold_tags=["gold/pass_rate"])
    with pytest.raises(ValueError, match="proxy_tag='reward/median'"):
        analysis.plot_proxy_vs_gold(tiny_runs["flow_grpo"], proxy_tag="reward/median")

    _write_scalars(tmp_path, {0: 1.0, 1: 2.0})
    _write_scalars(tmp_path, {0: 0.9, 1: 0.5}, tag="gold/pass_rate")
    fig = analysis.plot_proxy_vs_gold(tmp_path)
    proxy_axis, gold_axis = fig.axes
    assert gold_axis.get_lines()[0].get_ydata().tolist() == pytest.approx([0.9, 0.5])
    assert analysis.gold_metrics(tmp_path)["gold/pass_rate"].tolist() == pytest.approx([0.9, 0.5])


def test_nothing_is_written(tiny_runs):
    before = {p: os.path.getmtime(p) for p in tiny_runs["grpo_guard"].rglob("*")}
    analysis.plot_ratio_distribution(tiny_runs["grpo_guard"])
    after = {p: os.path.getmtime(p) for p in tiny_runs["grpo_guard"].rglob("*")}
    assert before == after
