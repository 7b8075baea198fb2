"""guardrl.analysis: a run's TensorBoard logs as pandas frames and matplotlib figures (docs/analysis.md).

    from guardrl import analysis
    run = analysis.resolve_run_dir("runs/tiny_grpo_guard")      # newest version_N
    analysis.load_scalars(run)                 # tag, step, value, wall_time (every event, latest per step)
    analysis.load_ratio_histograms(run)        # per iteration and denoising step k: buckets, mean, std
    analysis.clip_fractions(run)               # step, k, sign (pos_upper / neg_lower), value
    analysis.plot_ratio_distribution(run)      # the GRPO-Guard paper's diagnostic figure
    analysis.compare_runs({"flow_grpo": ..., "grpo_guard": ...})

Needs the `analysis` extra: pip install -e '.[analysis]' (pandas, matplotlib).
"""

try:
    import matplotlib  # noqa: F401
    import pandas  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"guardrl.analysis needs pandas and matplotlib ({error}); "
        "install them with: pip install -e '.[analysis]'"
    ) from error

from guardrl.analysis.events import (
    clip_fractions,
    compare_table,
    gold_metrics,
    load_ratio_histograms,
    load_scalars,
    resolve_run_dir,
    rewards,
    run_dir_from_env,
    run_dirs_from_env,
    run_summary,
    scalar_table,
    trained_steps,
)
from guardrl.analysis.plots import (
    AnalysisFigure,
    compare_runs,
    plot_clip_fractions,
    plot_proxy_vs_gold,
    plot_ratio_distribution,
    plot_ratio_histograms,
    to_png,
)

__all__ = [
    "AnalysisFigure",
    "clip_fractions",
    "compare_runs",
    "compare_table",
    "gold_metrics",
    "load_ratio_histograms",
    "load_scalars",
    "plot_clip_fractions",
    "plot_proxy_vs_gold",
    "plot_ratio_distribution",
    "plot_ratio_histograms",
    "resolve_run_dir",
    "rewards",
    "run_dir_from_env",
    "run_dirs_from_env",
    "run_summary",
    "scalar_table",
    "to_png",
    "trained_steps",
]
