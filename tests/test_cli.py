"""The `guardrl` command: every shipped config parses, the README's command runs, bad keys are named."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from guardrl.algorithm import VARIANCE_NORMALIZED_VARIANTS
from guardrl.cli import main
from tests.conftest import REPO_ROOT
from tests.published_recipes import MODELS
from tests.published_recipes import RECIPES as PUBLISHED_RECIPES

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_is_a_tiny_config_per_ratio_variant():
    from guardrl.algorithm import RATIO_VARIANTS

    tiny = {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS if os.sep + "tiny" + os.sep in p}
    assert set(RATIO_VARIANTS) <= tiny


# Configs that build offline here; the published recipes (sd35m/, flux/) name real hub models and GPUs.
OFFLINE_CONFIGS = [
    c
    for c in CONFIGS
    if os.sep + "tiny" + os.sep in c
    or os.sep + "toy" + os.sep in c
    or os.path.basename(c) == "quickstart.yaml"
]
TOY_CONFIGS = [c for c in CONFIGS if os.sep + "toy" + os.sep in c]


def test_toy_configs_differ_only_in_variant_clip_range_and_null_control():
    import yaml

    from guardrl.algorithm import RATIO_VARIANTS

    configs = {os.path.splitext(os.path.basename(c))[0]: yaml.safe_load(open(c)) for c in TOY_CONFIGS}
    # the entry points other tools use (issue: keep these names), plus any registered variant given one
    entry_points = {"flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard", "null_control"}
    assert entry_points <= set(configs) <= set(RATIO_VARIANTS) | {"null_control"}

    def shared(config):
        config = json.loads(json.dumps(config))
        del config["trainer"]["logger"]["init_args"]["name"]
        for key in ("ratio_variant", "clip_range", "null_control"):
            del config["model"]["grpo"][key]
        return config

    reference = shared(configs["grpo_guard"])
    assert all(shared(c) == reference for c in configs.values())
    assert configs["null_control"]["model"]["grpo"]["null_control"] is True
    assert configs["null_control"]["model"]["grpo"]["ratio_variant"] == "flow_grpo"
    assert sum(c["model"]["grpo"]["null_control"] for c in configs.values()) == 1
    # The published clip ranges (log_prob unit, per-element-mean log-probs of SD3.5-M at 512 px) times
    # sqrt(D), D = 16 latent channels x (512 / 8)^2 = 65,536, for the per_sqrt_element unit: FlowGRPO's for
    # the raw-ratio variants and the control, GRPO-Guard's for the normalised ones.
    flow_grpo = PUBLISHED_RECIPES["sd35m/flow_grpo_geneval.yaml"]
    grpo_guard = PUBLISHED_RECIPES["sd35m/grpo_guard_geneval.yaml"]
    side = flow_grpo["model.backbone.init_args.resolution"].value // MODELS["sd35m"]["vae_scale_factor"].value
    sqrt_d = (MODELS["sd35m"]["vae.latent_channels"].value * side**2) ** 0.5
    assert sqrt_d == 256.0
    for name, config in configs.items():
        normalised = config["model"]["grpo"]["ratio_variant"] in VARIANCE_NORMALIZED_VARIANTS
        published = (grpo_guard if normalised else flow_grpo)["model.grpo.clip_range"].value
        assert config["model"]["grpo"]["clip_range"] == pytest.approx(published * sqrt_d, rel=1e-3), name
        assert config["model"]["grpo"]["clip_range_unit"] == "per_sqrt_element"


# Overlays that go on top of a run config (`--config run.yaml --config configs/strategy/fsdp.yaml`).
OVERLAYS = [c for c in CONFIGS if os.sep + "strategy" + os.sep in c]
RECIPES = [c for c in CONFIGS if c not in OFFLINE_CONFIGS and c not in OVERLAYS]


def test_the_fsdp_overlay_builds_on_a_run_config(monkeypatch):
    from guardrl.sharding import FSDP2Strategy

    assert [os.path.relpath(c, REPO_ROOT) for c in OVERLAYS] == [
        os.path.join("configs", "strategy", "fsdp.yaml")
    ]
    monkeypatch.chdir(REPO_ROOT)
    cli = main(
        [
            "--config",
            "configs/tiny/grpo_guard.yaml",
            "--config",
            "configs/strategy/fsdp.yaml",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, FSDP2Strategy)


@pytest.mark.parametrize(
    "config", OFFLINE_CONFIGS, ids=[os.path.relpath(c, REPO_ROOT) for c in OFFLINE_CONFIGS]
)
def test_every_shipped_config_builds(config, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs name their prompt files relative to the repository root
    cli = main(["--config", config, "--trainer.logger", "false"], run=False)
    name = os.path.splitext(os.path.basename(config))[0]
    if os.sep + "toy" + os.sep in config:
        from guardrl.toy import ToyBackbone, ToyProxyReward

        assert isinstance(cli.model.backbone, ToyBackbone) and isinstance(
            cli.model.rewards[0], ToyProxyReward
        )
    if os.sep + "tiny" + os.sep in config or os.sep + "toy" + os.sep in config:
        assert cli.model.grpo.ratio_variant == ("flow_grpo" if name == "null_control" else name)
        assert cli.model.group_size == cli.datamodule.group_size
        # several optimizer steps per rollout, so that the ratio leaves 1
        updates = cli.model.grpo.num_inner_epochs * cli.datamodule.batch_size // cli.model.grpo.minibatch_size
        assert updates // cli.model.grpo.gradient_accumulation_steps >= 2


def _run_guardrl(args, cwd, timeout=300):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "guardrl.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_command_runs_and_writes_the_documented_events(tmp_path):
    result = _run_guardrl(
        [
            "fit",
            "--config",
            "configs/tiny/grpo_guard.yaml",
            "--model.max_iterations",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version_dir,) = glob.glob(str(tmp_path / "tiny_grpo_guard" / "version_*"))
    accumulator = EventAccumulator(version_dir, size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    histograms = set(accumulator.Tags()["histograms"])
    # Every name the README documents (issue 2's list), for each of the 9 SDE steps of 10 sampler steps.
    expected_scalars = {"reward/mean", "train/loss", "train/kl", "grad/norm"}
    expected_histograms = set()
    for k in range(9):
        expected_scalars |= {
            f"ratio/mean_t{k}",
            f"ratio/std_t{k}",
            f"clip/frac_pos_upper_t{k}",
            f"clip/frac_neg_lower_t{k}",
            f"grad/norm_t{k}",
        }
        expected_histograms |= {f"ratio/log_ratio_t{k}", f"ratio/raw_log_ratio_t{k}"}
    assert expected_scalars <= scalars, sorted(expected_scalars - scalars)
    assert expected_histograms <= histograms, sorted(expected_histograms - histograms)
    assert "ratio/mean_t9" not in scalars  # the last step is an Euler step and is never trained
    # The x axis of scalars and histograms alike is the GRPO iteration (0, 1), not the optimizer step.
    assert [event.step for event in accumulator.Scalars("reward/mean")] == [0, 1]
    assert [event.step for event in accumulator.Scalars("ratio/mean_t3")] == [0, 1]
    assert [event.step for event in accumulator.Histograms("ratio/log_ratio_t3")] == [0, 1]
    assert os.path.isfile(os.path.join(version_dir, "config.yaml"))
    assert glob.glob(os.path.join(version_dir, "checkpoints", "*.ckpt"))


@pytest.mark.slow
def test_readme_first_command_runs_the_toy_world_and_says_where_its_logs_are(tmp_path):
    # The README's first command with two iterations instead of thirty (same config, same code path); that it
    # learns in thirty is shown in docs/learning.md and tested in tests/test_learning.py.
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        assert "guardrl fit --config configs/quickstart.yaml\n" in f.read()
    result = _run_guardrl(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--model.max_iterations",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    version_dir = str(tmp_path / "toy_quickstart" / "version_0")
    assert f"logs: {version_dir}" in output
    assert "grpo_guard" in output and "ToyBackbone, rewards toy_color_share x 1" in output
    assert "guardrl: finished at iteration 2 of 2" in output and "reward/mean:" in output
    # the held-out evaluation's first and last values (configs/quickstart.yaml's Evaluation callback)
    assert "held-out, iteration 0 -> 2: eval/proxy " in output and "eval/learned_judge" in output
    assert glob.glob(os.path.join(version_dir, "events.out.tfevents.*"))
    assert os.path.isfile(os.path.join(version_dir, "checkpoints", "last.ckpt"))


@pytest.mark.slow
def test_print_config_and_misspelt_keys(tmp_path):
    printed = _run_guardrl(
        ["fit", "--config", "configs/tiny/flow_grpo.yaml", "--print_config"], cwd=REPO_ROOT
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert (
        "ratio_variant: flow_grpo" in printed.stdout and "clip_range_unit: per_sqrt_element" in printed.stdout
    )
    misspelt = _run_guardrl(
        ["fit", "--config", "configs/tiny/flow_grpo.yaml", "--model.grpo.clip_rnage", "1"], cwd=REPO_ROOT
    )
    assert misspelt.returncode != 0
    assert "clip_rnage" in misspelt.stderr


@pytest.mark.slow
def test_installed_console_script_exits_zero_after_a_run(tmp_path):
    # setuptools' wrapper does sys.exit(entry_point()): a returned object would be exit status 1.
    script = shutil.which("guardrl")
    assert script is not None, "the `guardrl` console script is not installed (pip install -e .)"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            script,
            "fit",
            "--config",
            "configs/tiny/grpo_guard.yaml",
            "--model.max_iterations",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert glob.glob(str(tmp_path / "tiny_grpo_guard" / "version_0" / "checkpoints" / "last.ckpt"))


def _option(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]  # "model.rewards.0.class_path"
    return value


def test_every_recipe_has_its_published_numbers():
    assert sorted(os.path.relpath(c, os.path.join(REPO_ROOT, "configs")) for c in RECIPES) == sorted(
        PUBLISHED_RECIPES
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED_RECIPES))
def test_published_recipe_parses_and_matches_its_sources(name, monkeypatch, capsys):
    """Parsed by the real CLI (types, class paths and every init arg checked, nothing loaded), checked for the
    batch arithmetic an iteration needs, then compared with its sources' numbers (tests/published_recipes.py:
    FlowGRPO's, GRPO-Guard's and DanceGRPO's published settings, each with its citation)."""
    import yaml

    from guardrl.checks import check_batch_sizes
    from guardrl.options import GRPOOptions, SamplingOptions, check_compatible

    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join("configs", name), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]
    grpo = GRPOOptions(**model["grpo"])
    sampling = SamplingOptions(**model["sampling"])
    check_compatible(sampling, grpo)
    check_batch_sizes(grpo, data["prompts_per_batch"], data["group_size"])
    samples = data["prompts_per_batch"] * data["group_size"]
    steps = grpo.num_inner_epochs * (samples // grpo.minibatch_size) // grpo.gradient_accumulation_steps
    published = PUBLISHED_RECIPES[name]
    assert len(published) >= 10
    for option, row in published.items():
        value = steps if option == "optimizer_steps_per_iteration" else _option(config, option)
        if option.endswith("target_modules"):
            value = sorted(value)
        if isinstance(row.value, float):
            assert value == pytest.approx(row.value, rel=1e-12, abs=0), f"{option}={value!r}; {row.source}"
        else:
            assert value == row.value, f"{option}={value!r}; {row.source}"
