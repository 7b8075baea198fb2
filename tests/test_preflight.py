"""guardrl.preflight: command-line and config mistakes found before torch and Lightning are imported."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from guardrl.algorithm import RATIO_VARIANTS
from guardrl.preflight import GROUP_CLASSES, PreflightError, check, known_keys, known_options

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO_ROOT, "configs", "quickstart.yaml")
SHIPPED_CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))


def _parser_keys() -> set[str]:
    from guardrl.cli import main

    cli = main(["--config", QUICKSTART], run=False)
    return {a.dest for a in cli.parser._actions if not a.dest.endswith(".help")} - {"help", "print_shtab"}


def test_known_options_match_the_full_parser():
    """Every key preflight knows exists in the full parser, and every closed group it knows has exactly the
    full parser's options: a new field or argument is picked up from the source, no list to update."""
    # ckpt_path exists on the subcommands only (run=False has none); verbose on `validate` only
    parser = _parser_keys() | {"ckpt_path", "verbose"}
    known = set(known_keys())
    assert known - parser == set()

    def closed_groups(tree, prefix=""):
        for key, option in tree.items():
            if option.children is not None:
                yield prefix + key, option.children
                yield from closed_groups(option.children, f"{prefix}{key}.")

    groups = dict(closed_groups(known_options()))
    # The groups that must be known all the way down (a regression to "open" would silently check nothing).
    for group in (
        "model",
        "model.grpo",
        "model.sampling",
        "model.faults",
        "model.performance",
        "data",
        "trainer",
        "checkpoint",
        "ratio_stats",
        "image_grid",
        "run_summary",
        "graceful_shutdown",
    ):
        assert group in groups, group
    for group, children in groups.items():
        in_parser = {k[len(group) + 1 :].split(".")[0] for k in parser if k.startswith(group + ".")}
        assert set(children) == in_parser, group
    assert set(GROUP_CLASSES) <= {k.split(".")[0] for k in parser}


def test_choices_come_from_the_registries():
    """Read from the source through options.py's aliases (`RatioVariant = Literal[tuple(RATIO_VARIANTS)]`), so
    they are the registries' keys, in order, and the parser's Literals."""
    import typing

    from guardrl.algorithm import CLIP_RANGE_UNITS, RATIO_VARIANTS
    from guardrl.options import GRPOOptions
    from guardrl.sampling.sde import SDE_TYPES

    grpo = known_options()["model"].children["grpo"].children
    assert grpo["ratio_variant"].choices == tuple(RATIO_VARIANTS)
    assert {"flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard"} <= set(RATIO_VARIANTS)
    assert grpo["ratio_variant"].choices == typing.get_args(
        typing.get_type_hints(GRPOOptions)["ratio_variant"]
    )
    assert grpo["clip_range_unit"].choices == CLIP_RANGE_UNITS == ("log_prob", "per_sqrt_element")
    assert known_options()["model"].children["sampling"].children["sde_type"].choices == SDE_TYPES
    assert grpo["clip_range"].choices is None


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_every_shipped_config_passes(config):
    check(["fit", "--config", config])


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--config", QUICKSTART, "--model.grpo.ratio_variant", "flow_grpo"],
        ["fit", "--config", QUICKSTART, "--model.grpo.ratio_variant=ratio_norm", "--trainer.max_steps", "3"],
        ["fit", "--config", QUICKSTART, "--trainer.callbacks+=tests.sharding_probe.ShardingProbe"],
        ["fit", "--config", QUICKSTART, "--model.backbone.init_args.anything_below_a_class_path", "1"],
        [
            "fit",
            "--config",
            QUICKSTART,
            "--model.rewards",
            '[{"class_path": "guardrl.rewards.JpegCompressibility"}]',
        ],
        [
            "fit",
            "--config",
            QUICKSTART,
            "--model.grpo",
            '{"ratio_variant": "no such one, read by the parser"}',
        ],
        ["fit", "--config", QUICKSTART, "--print_config"],
        ["fit", "--config", QUICKSTART, "--ckpt_path", "last"],
        ["fit", "--model.grpo.clip_rnge", "1", "--help"],  # --help: the full parser prints it
        [],
    ],
)
def test_what_the_full_parser_accepts_passes(args):
    check(args)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["fit", "--config", QUICKSTART, "--model.grpo.clip_rnge", "1e-4"],
            "option 'model.grpo.clip_rnge' (command line) does not exist; "
            "did you mean 'model.grpo.clip_range'",
        ),
        (
            ["fit", "--config", QUICKSTART, "--trainer.max_step=3"],
            "option 'trainer.max_step' (command line) does not exist; did you mean 'trainer.max_steps'",
        ),
        (
            ["fit", "--config", QUICKSTART, "--modle.seed", "1"],
            "option 'modle' (command line) does not exist; did you mean 'model'",
        ),
        (
            ["fit", "--config", QUICKSTART, "--model.grpo.ratio_variant", "grpo_gaurd"],
            f"model.grpo.ratio_variant must be one of {', '.join(map(repr, RATIO_VARIANTS))}; "
            "got 'grpo_gaurd' (command line)",
        ),
        (["fit", "--config", "/no/such.yaml"], "--config '/no/such.yaml' does not exist"),
        (["fitt", "--config", QUICKSTART], "unknown subcommand 'fitt' (did you mean 'fit'?)"),
        (["test", "--config", QUICKSTART], "unknown subcommand 'test'; guardrl has two: fit (`guardrl fit"),
        (["fit", "--config"], "--config needs a file path"),
    ],
)
def test_command_line_mistakes_are_refused(args, message):
    with pytest.raises(PreflightError) as raised:
        check(args)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model:\n  grpo:\n    clip_rang: 1.0e-4\n",
            "option 'model.grpo.clip_rang' (in {path}) does not exist; did you mean 'model.grpo.clip_range'",
        ),
        (
            "data:\n  train_promts: p.txt\n",
            "option 'data.train_promts' (in {path}) does not exist; did you mean 'data.train_prompts'",
        ),
        (
            "model:\n  sampling:\n    sde_type: dance\n",
            "model.sampling.sde_type must be one of 'flow_grpo', 'dance_grpo', 'cps'; "
            "got 'dance' (in {path})",
        ),
        ("checkpoint:\n  every_n_iteration: 2\n", "did you mean 'checkpoint.every_n_iterations'"),
        ("trainer: {max_epoch: 1}\n", "did you mean 'trainer.max_epochs'"),
        (
            "- model\n- data\n",
            "--config '{path}' must hold a mapping of options (model:, data:, trainer:, ...), got a list",
        ),
        ("model: [unclosed\n", "--config '{path}' is not valid YAML"),
        (
            "zzz: 1\n",
            "option 'zzz' (in {path}) does not exist; fit accepts: checkpoint, ckpt_path, config, data,",
        ),
    ],
)
def test_config_file_mistakes_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PreflightError) as raised:
        check(["fit", "--config", QUICKSTART, "--config", str(path)])
    assert message.format(path=path) in str(raised.value)


def test_an_empty_config_file_and_a_bom_pass(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bom.yaml").write_bytes("\ufeffmodel:\n  seed: 3\n".encode())
    check(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--config",
            str(tmp_path / "empty.yaml"),
            "--config",
            str(tmp_path / "bom.yaml"),
        ]
    )


def test_annotation_forms():
    """Optional[Literal] also takes null; Optional[dataclass] is a class-type option to jsonargparse
    (open)."""
    import ast

    from guardrl.preflight import _option

    def option(text: str):
        return _option(ast.parse(text, mode="eval").body, "guardrl.module")

    assert option('Optional[Literal["a", "b"]]').choices == ("a", "b", None)
    assert option('Literal["a"] | None').choices == ("a", None)
    assert option('"Literal[1, 2]"').choices == (1, 2)
    assert option("GRPOOptions").children is not None and "ratio_variant" in option("GRPOOptions").children
    assert option("Optional[GRPOOptions]").children is None
    assert option("FlowBackbone").children is None  # a class_path type: open


def _console(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from guardrl.console import console_main\n"
        f"sys.argv = ['guardrl', *{list(args)!r}]\n"
        "try:\n"
        "    console_main()\n"
        "finally:\n"
        "    print('heavy imports:', sorted({'torch', 'lightning'} & set(sys.modules)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_console_script_refuses_before_importing_torch_or_lightning():
    """The mechanism behind "a mistake is reported within about 0.3 s" (8-14 s is Lightning's import alone on
    2 cores): the console exits with the parser's status 2 and neither torch nor Lightning was imported."""
    result = _console("fit", "--config", "configs/quickstart.yaml", "--model.grpo.clip_rnge", "1e-4")
    assert result.returncode == 2, result.stderr
    assert "guardrl fit: error: option 'model.grpo.clip_rnge' (command line) does not exist" in result.stderr
    assert result.stderr.count("\n") == 2  # the usage line and the error, no traceback, no option list
    assert "heavy imports: []" in result.stdout

    version = _console("--version")
    assert version.returncode == 0 and version.stdout.startswith("guardrl ")
    assert "torch 2." in version.stdout and "heavy imports: []" in version.stdout
