"""CONTRIBUTING.md stays true: its ratio-variant recipe is carried out as written, its reward example runs,
and every repository path, `file.py::test_name`, test, function and name it cites exists.

The recipe's code is not copied here: the test reads the python block under "## Recipe: add a ratio variant",
runs it in the namespace of guardrl/algorithm/ratios.py (where the recipe says to paste it), registers the
function under the name the recipe's registry line gives, and checks it with hand-worked numbers. The package
itself is not edited: the registration is a `monkeypatch.setitem` on RATIO_VARIANTS, undone after the test.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest
import torch

import guardrl.algorithm.ratios as ratios
from guardrl.algorithm import RATIO_VARIANTS, RatioTerms, compute_ratio_terms
from guardrl.options import GRPOOptions, SamplingOptions, check_compatible
from tests.conftest import REPO_ROOT

DOC = os.path.join(REPO_ROOT, "CONTRIBUTING.md")
F64 = torch.float64


def _doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _section(heading: str) -> str:
    text = _doc()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


RECIPE = "Recipe: add a ratio variant"


def _worked_variant():
    """(name, function) as CONTRIBUTING.md defines and registers it."""
    section = _section(RECIPE)
    code = _blocks(section, "python")[0]
    namespace = dict(vars(ratios))  # pasted into ratios.py: its imports and types are in scope
    exec(compile(code, "CONTRIBUTING.md", "exec"), namespace)
    (registry_line,) = _blocks(section, "text")
    name, function = re.fullmatch(r'\s*"(\w+)": (\w+),\s*', registry_line).groups()
    return name, namespace[function]


@pytest.fixture
def registered(monkeypatch):
    name, function = _worked_variant()
    assert name not in RATIO_VARIANTS, "the worked example must be a new variant"
    monkeypatch.setitem(RATIO_VARIANTS, name, function)
    return name, function


def test_the_worked_variant_is_refused_until_registered():
    name, _ = _worked_variant()
    with pytest.raises(ValueError, match=rf"grpo\.ratio_variant must be one of .*; got '{name}'"):
        GRPOOptions(ratio_variant=name)


def test_a_registered_variant_is_accepted_by_the_options(registered):
    # GRPOOptions.__post_init__ checks tuple(RATIO_VARIANTS) when the options are built, so a variant
    # registered after import is accepted (the parser's Literal, built at import, would not list it).
    name, _ = registered
    options = GRPOOptions(ratio_variant=name)
    assert options.ratio_variant == name
    check_compatible(SamplingOptions(), options)


def test_the_worked_variant_computes_the_hand_worked_numbers(registered):
    name, _ = registered
    # log r = [-7, -2], ||dmu||^2/(2 s^2) = [10, 4]: log r + half of it = [-7 + 5, -2 + 2] = [-2, 0], weight 1
    terms = RatioTerms(
        raw_log_ratio=torch.tensor([-7.0, -2.0], dtype=F64),
        mean_shift=torch.tensor([10.0, 4.0], dtype=F64),
        normalized_log_ratio=torch.tensor([1.5, 0.5], dtype=F64),
        std=torch.tensor([0.5, 0.25], dtype=F64),
        dt=torch.tensor([-0.25, -0.125], dtype=F64),
    )
    out = RATIO_VARIANTS[name](terms)
    assert torch.equal(out.log_ratio, torch.tensor([-2.0, 0.0], dtype=F64))
    assert torch.equal(out.weight, torch.ones(2, dtype=F64))


def test_the_rows_the_recipe_adds_to_test_algorithm_hold(registered):
    # The parametrize rows CONTRIBUTING.md tells you to paste, run on test_algorithm's own hand example.
    from tests.test_algorithm import _hand_example

    name, _ = registered
    lines = [line.strip() for line in _section(RECIPE).splitlines()]
    rows = [ast.literal_eval(line.rstrip(",")) for line in lines if line.startswith(f'("{name}",')]
    assert {row[1] for row in rows} == {"sum", "mean"}
    next_latents, mean_old, mean_theta, std, dt, _ = _hand_example()
    for variant, reduction, log_ratio, weight in rows:
        terms = compute_ratio_terms(next_latents, mean_old, mean_theta, std, dt, reduction)
        out = RATIO_VARIANTS[variant](terms)
        torch.testing.assert_close(out.log_ratio, torch.tensor(log_ratio, dtype=F64), rtol=0, atol=1e-14)
        torch.testing.assert_close(out.weight, torch.tensor(weight, dtype=F64), rtol=0, atol=0)


def test_the_reward_example_runs():
    from guardrl.rewards import Reward

    (code,) = _blocks(_section("Recipe: add a reward"), "python")
    namespace = {"Reward": Reward, "torch": torch}
    exec(compile(code, "CONTRIBUTING.md", "exec"), namespace)
    reward = namespace["Brightness"](weight=0.5)
    images = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.25)])
    assert reward.name == "brightness" and reward.weight == 0.5
    assert torch.equal(reward(images, ["a", "b"]), torch.tensor([0.0, 0.25]))


TOP_LEVEL = set(os.listdir(REPO_ROOT))


def _cited_paths() -> list[str]:
    """Inline `code` spans (fenced blocks left out) that look like repository paths."""
    prose = re.sub(r"^```.*?^```", "", _doc(), flags=re.MULTILINE | re.DOTALL)
    spans = re.findall(r"`([^`\n]+)`", prose)
    paths = [re.sub(r"\[[^\]]*\]\([^)]*\)", "", s) for s in spans]
    return [
        p
        for p in paths
        if "/" in p
        and not re.search(r"\s|<|://", p)
        and not p.startswith("/")
        and (p.split("::")[0].endswith((".py", ".yaml", ".md", "/")) or p.split("/")[0] in TOP_LEVEL)
    ]


def test_every_path_in_contributing_exists():
    cited = _cited_paths()
    assert any(p.startswith("tests/test_policy.py::") for p in cited)
    missing = []
    for cited_path in cited:
        path, _, test = cited_path.partition("::")
        full = os.path.join(REPO_ROOT, path)
        if not glob.glob(full):
            # The recipe's own new configs are the only paths that may not exist yet.
            if not re.fullmatch(r"configs/(tiny|toy)/half_revised\.yaml", path):
                missing.append(cited_path)
            continue
        if test:
            with open(full, encoding="utf-8") as f:
                if not re.search(rf"^def {re.escape(test)}\(", f.read(), flags=re.MULTILINE):
                    missing.append(cited_path)
    assert not missing, f"CONTRIBUTING.md cites paths or tests that do not exist: {missing}"


def test_every_plain_path_in_contributing_exists():
    # Paths written without backticks (guardrl/policy/tiny.py, tests/test_learning.py, ...), outside code.
    prose = re.sub(r"^```.*?^```", "", _doc(), flags=re.MULTILINE | re.DOTALL)
    words = re.findall(r"(?<![\w/.`<-])((?:[\w.-]+/)+[\w.-]*\.(?:py|yaml|md|toml|cfg))\b", prose)
    missing = [w for w in set(words) if not os.path.exists(os.path.join(REPO_ROOT, w))]
    assert words and not missing, f"CONTRIBUTING.md names files that do not exist: {sorted(missing)}"


def _sources(*patterns: str) -> str:
    texts = []
    for pattern in patterns:
        for path in glob.glob(os.path.join(REPO_ROOT, pattern), recursive=True):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    return "\n".join(texts)


def test_every_name_in_contributing_exists():
    # Inline code spans that are names: `test_...` must be a test in tests/; `f(...)` a function or method
    # defined in guardrl/; `CamelCase`, `ALL_CAPS` and `snake_case` names must occur in guardrl/, tests/, the
    # configs or the project files (the doc's own example classes aside).
    doc = _doc()
    prose = re.sub(r"^```.*?^```", "", doc, flags=re.MULTILINE | re.DOTALL)
    broken = [line for line in prose.splitlines() if line.count("`") % 2]
    assert not broken, f"inline code spans must not break across lines: {broken}"
    spans = set(re.findall(r"`([^`\n]+)`", prose))
    tests_source = _sources("tests/*.py")
    package_source = _sources("guardrl/**/*.py")
    everything = tests_source + package_source + _sources("configs/**/*.yaml", "*.toml", "*.cfg")
    defined_in_doc = set(re.findall(r"^class (\w+)", doc, flags=re.MULTILINE))
    tests = [s for s in spans if re.fullmatch(r"test_\w+", s)]
    calls = {s.split("(")[0].split(".")[-1] for s in spans if re.fullmatch(r"[A-Za-z_][\w.]*\(.*\)", s)}
    names = [s for s in spans if re.fullmatch(r"[A-Za-z_]\w*", s) and s not in defined_in_doc]
    assert tests and calls and names
    missing = [t for t in tests if not re.search(rf"^def {t}\(", tests_source, flags=re.MULTILINE)]
    missing += [c for c in calls if c != "tuple" and not re.search(rf"\bdef {c}\(", package_source)]
    missing += [n for n in names if not re.search(rf"\b{n}\b", everything)]
    assert not missing, f"CONTRIBUTING.md names what does not exist: {sorted(missing)}"
