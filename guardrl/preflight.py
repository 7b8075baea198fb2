"""What `guardrl fit` checks before it imports torch and Lightning.

Importing Lightning takes 8-14 s on a 2-core machine, and the full parser needs it (it reads the signatures of
GRPOModule, the data module, the Trainer and the callbacks). A misspelt option, a choice that does not exist
or a config file that is missing should not cost that wait, so the console script first runs `check` here,
with the standard library and PyYAML only (about 0.1 s):

- the subcommand is `fit` or `validate`;
- every `--config` file exists, is readable, is YAML and holds a mapping;
- every option named in a config file or on the command line exists, down to the option groups whose shape is
  known (GRPOModule's arguments and its option dataclasses, the data module, the Trainer, the forced
  callbacks);
- every option typed `Literal[...]` holds one of its choices.

The known options are read from the classes' source code with `ast` (no import), so they cannot drift from the
classes; tests/test_preflight.py checks them against the full parser. What this cannot know (anything below a
`class_path`, a `**kwargs`, a value's type) is left to the full parser, which still checks everything:
preflight only ever refuses what the full parser would refuse too.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from guardrl.suggestions import close_keys

# The classes whose signatures the full parser turns into option groups (guardrl/cli.py adds the same ones).
GROUP_CLASSES: dict[str, tuple[str, str]] = {
    "model": ("guardrl.module", "GRPOModule"),
    "data": ("guardrl.data.datamodule", "PromptDataModule"),
    "trainer": ("lightning.pytorch.trainer.trainer", "Trainer"),
    "ratio_stats": ("guardrl.callbacks.ratio_stats", "RatioStatsCallback"),
    "checkpoint": ("guardrl.checkpointing", "IterationCheckpoint"),
    "graceful_shutdown": ("guardrl.callbacks.preemption", "GracefulShutdown"),
    "image_grid": ("guardrl.callbacks.image_grid", "ImageGridCallback"),
    "run_summary": ("guardrl.callbacks.run_summary", "RunSummaryCallback"),
    "progress_bar": ("guardrl.callbacks.progress", "GRPOProgressBar"),
}
# The fit subcommand's other top-level options (LightningCLI's).
# (`validate` also takes `verbose`.)
OTHER_TOP_LEVEL = ("config", "print_config", "seed_everything", "ckpt_path", "verbose")
SUBCOMMANDS = ("fit", "validate")
OPEN = None  # an option whose inside preflight does not know (a class_path, a dict, **kwargs)


class PreflightError(ValueError):
    """A command-line or config mistake found before the heavy imports; the message names option and value."""


@dataclasses.dataclass
class Option:
    choices: Optional[tuple] = None  # from Literal[...]
    children: Optional[dict[str, Option]] = OPEN  # a known group's options; OPEN if unknown or not a group


# ------------------------------------------------------------------------------------------ reading source


def _package_dir(top: str) -> Optional[str]:
    # find_spec of a top-level name locates the package without importing it (a dotted name would import
    # its parents, which for lightning.pytorch is the 8-14 s this module avoids).
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _module_file(module: str) -> Optional[str]:
    top, *rest = module.split(".")
    root = _package_dir(top)
    if root is None:
        return None
    base = os.path.join(root, *rest)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _parse(module: str) -> Optional[ast.Module]:
    path = _module_file(module)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _find_class(module: str, name: str, depth: int = 0) -> Optional[tuple[str, ast.ClassDef]]:
    """The class `name` as seen from `module`: defined there, or imported there (followed through
    re-exports)."""
    tree = _parse(module)
    if tree is None or depth > 4:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    source = _imported_from(tree, name)
    return None if source is None else _find_class(*source, depth + 1)


def _imported_from(tree: ast.Module, name: str) -> Optional[tuple[str, str]]:
    """(module, original name) when `tree` binds `name` with an absolute `from module import ...`."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return node.module, alias.name
    return None


def _strip_optional(annotation: Optional[ast.expr]) -> Optional[ast.expr]:
    """`Optional[X]`, `X | None` and `None | X` -> X; anything else unchanged."""
    if isinstance(annotation, ast.Subscript) and _name(annotation.value) == "Optional":
        return annotation.slice
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        sides = [annotation.left, annotation.right]
        rest = [s for s in sides if not (isinstance(s, ast.Constant) and s.value is None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _name(node: Optional[ast.expr]) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _option(annotation: Optional[ast.expr], module: str) -> Option:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # a string annotation
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return Option()
    stripped = _strip_optional(annotation)
    optional, annotation = stripped is not annotation, stripped
    if isinstance(annotation, ast.Subscript) and _name(annotation.value) == "Literal":
        choices = _constant_names(module, annotation.slice)
        if choices is None:
            return Option()
        return Option(choices=choices + ((None,) if optional else ()))
    name = _name(annotation)
    if name is not None and module.startswith("guardrl"):
        alias = _module_level_value(module, name)  # `RatioVariant = Literal[tuple(RATIO_VARIANTS)]`
        if alias is not None and isinstance(alias[1], ast.Subscript) and _name(alias[1].value) == "Literal":
            literal = ast.Subscript(value=ast.Name("Optional"), slice=alias[1]) if optional else alias[1]
            return _option(literal, alias[0])
    # An Optional[dataclass] is a class-type option for jsonargparse (it also takes
    # class_path/init_args): open.
    if name is not None and module.startswith("guardrl") and not optional:
        found = _find_class(module, name)
        if found is not None and _is_dataclass(found[1]):
            return Option(children=_dataclass_fields(*found))
    return Option()


def _module_level_value(module: str, name: str, depth: int = 0) -> Optional[tuple[str, ast.expr]]:
    """(module, value) of a module-level `name = value` as seen from `module` (followed through imports)."""
    tree = _parse(module)
    if tree is None or depth > 4:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return module, value
    source = _imported_from(tree, name)
    return None if source is None else _module_level_value(*source, depth + 1)


def _constant_names(module: str, node: ast.expr) -> Optional[tuple]:
    """The constants a Literal's argument stands for: `"a", "b"`, or `tuple(NAME)` / `NAME` where NAME is a
    module-level tuple or dict of constants (a registry: its keys). None when it is anything else."""
    if isinstance(node, ast.Call) and _name(node.func) in ("tuple", "list") and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.Name):
        found = _module_level_value(module, node.id)
        if found is None:
            return None
        module, node = found
        if isinstance(node, ast.Dict):
            node = ast.Tuple(elts=[k for k in node.keys if k is not None])
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List)) else [node]
    try:
        return tuple(ast.literal_eval(e) for e in elements)
    except ValueError:
        return None


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any(_name(d.func if isinstance(d, ast.Call) else d) == "dataclass" for d in node.decorator_list)


def _dataclass_fields(module: str, node: ast.ClassDef) -> Optional[dict[str, Option]]:
    fields: dict[str, Option] = {}
    for base in node.bases:
        found = _find_class(module, _name(base) or "")
        if found is None or not _is_dataclass(found[1]):
            return OPEN  # fields from a class preflight cannot read
        inherited = _dataclass_fields(*found)
        if inherited is OPEN:
            return OPEN
        fields.update(inherited)
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            if _name(statement.annotation) == "ClassVar" or (
                isinstance(statement.annotation, ast.Subscript)
                and _name(statement.annotation.value) == "ClassVar"
            ):
                continue
            fields[statement.target.id] = _option(statement.annotation, module)
    return fields


def _init_options(module: str, name: str) -> Optional[dict[str, Option]]:
    """The options of `name.__init__` (what the full parser offers for a class group), or OPEN where the
    signature passes **kwargs on to a parent preflight does not read."""
    found = _find_class(module, name)
    if found is None:
        return OPEN
    module, node = found
    init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    if init is None:
        return OPEN  # inherited __init__: not followed
    if init.args.kwarg is not None or init.args.vararg is not None:
        return OPEN
    arguments = init.args.posonlyargs + init.args.args + init.args.kwonlyargs
    return {a.arg: _option(a.annotation, module) for a in arguments if a.arg != "self"}


@functools.lru_cache(maxsize=None)
def known_options() -> dict[str, Option]:
    """The fit subcommand's options as far as preflight knows them, as a tree."""
    tree = {key: Option() for key in OTHER_TOP_LEVEL}
    for group, (module, name) in GROUP_CLASSES.items():
        tree[group] = Option(children=_init_options(module, name))
    return tree


def known_keys(tree: Optional[dict[str, Option]] = None, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the known tree (closed groups all the way down)."""
    for key, option in (known_options() if tree is None else tree).items():
        yield prefix + key
        if option.children is not None:
            yield from known_keys(option.children, f"{prefix}{key}.")


# ----------------------------------------------------------------------------------------------- checking


def _check_key(path: Sequence[str], value: Any, source: str, check_value: bool = True) -> None:
    """Refuse an unknown key or a value outside its choices; stop silently where the tree is open."""
    level: Optional[dict[str, Option]] = known_options()
    for i, part in enumerate(path):
        if level is None:
            return
        if part not in level:
            key = ".".join(path[: i + 1])
            siblings = [".".join([*path[:i], k]) for k in level]
            close = close_keys(key, siblings)
            hint = f"; did you mean {' or '.join(map(repr, close))}" if close else ""
            group = ".".join(path[:i])
            allowed = f"; {group or 'fit'} accepts: {', '.join(sorted(level))}" if not close else ""
            raise PreflightError(
                f"option {key!r} ({source}) does not exist{hint}{allowed} "
                "(`guardrl fit --help` lists every option)"
            )
        option = level[part]
        if i == len(path) - 1:
            if check_value and option.choices is not None and value not in option.choices:
                raise PreflightError(
                    f"{'.'.join(path)} must be one of {', '.join(map(repr, option.choices))}; got {value!r} "
                    f"({source})"
                )
            if option.children is not None and isinstance(value, dict):
                for child, child_value in value.items():
                    _check_key([*path, *str(child).split(".")], child_value, source, check_value)
            return
        level = option.children


def load_config(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise PreflightError(f"--config {path!r} {what}; give the path of a YAML config file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise PreflightError(f"--config {path!r} cannot be read: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()
        raise PreflightError(f"--config {path!r} is not valid YAML: {' '.join(first[:4])}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise PreflightError(
            f"--config {path!r} must hold a mapping of options (model:, data:, trainer:, ...), got a "
            f"{type(config).__name__}"
        )
    return config


def _cli_value(argv: Sequence[str], i: int) -> tuple[Any, bool]:
    """The value of the option at argv[i] (after '=' or the next argument) as YAML reads it, and whether there
    is one."""
    import yaml

    arg = argv[i]
    if "=" in arg:
        text = arg.split("=", 1)[1]
    elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        text = argv[i + 1]
    else:
        return None, False
    try:
        return yaml.safe_load(text), True
    except yaml.YAMLError:
        return text, True


def check(argv: Sequence[str]) -> None:
    """Raise PreflightError for what is surely wrong in `guardrl` argv; return quietly otherwise (including
    for --help, which the full parser prints)."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is None:
        return  # no subcommand: the full parser's own message
    if argv[first] not in SUBCOMMANDS:
        close = close_keys(argv[first], SUBCOMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PreflightError(
            f"unknown subcommand {argv[first]!r}{hint}; guardrl has two: fit (`guardrl fit --config FILE`) "
            "and validate (`guardrl validate --config FILE --ckpt_path CKPT`)"
        )
    rest = argv[first + 1 :]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-c", "--config") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else None)
            if path is None:
                raise PreflightError("--config needs a file path")
            for key, value in load_config(path).items():
                _check_key(str(key).split("."), value, f"in {path}")
            i += 1 if "=" in arg else 2
            continue
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].rstrip("+")
            value, has_value = _cli_value(rest, i)
            # A whole group given on the command line (`--model.grpo '{...}'` or a file) is the parser's
            # to read.
            _check_key(
                key.split("."), value, "command line", check_value=has_value and not isinstance(value, dict)
            )
        i += 1


def main_or_exit(argv: Sequence[str]) -> None:
    """`check`, printing a PreflightError the way the parser prints its errors (exit status 2)."""
    try:
        check(argv)
    except PreflightError as error:
        prog = "guardrl fit" if "fit" in argv else "guardrl"
        sys.stderr.write(f"usage: {prog} [options]\n{prog}: error: {error}\n")
        sys.exit(2)
