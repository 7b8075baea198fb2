"""Closest-name suggestions for parser errors. Standard library only: `guardrl.preflight` uses these before
torch and Lightning are imported, and the full parser (`guardrl.cli`) uses the same ones after."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


def unknown_keys(message: str) -> list[str]:
    """The dotted keys a jsonargparse error message says it does not know (command-line flags and config
    files)."""
    keys = []
    if "unrecognized arguments:" in message:
        keys += re.findall(r"--([\w.]+)", message.split("unrecognized arguments:", 1)[1])
    for group, key in re.findall(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message):
        keys.append(f"{group}.{key}")
    keys += re.findall(r"Subcommand '[\w.-]+' does not accept option '([\w.]+)'", message)
    return keys


def close_keys(key: str, known_keys: Iterable[str], n: int = 2) -> list[str]:
    known = sorted({k for k in known_keys if k and k != "help"})
    return difflib.get_close_matches(key, known, n=n, cutoff=0.75)


def did_you_mean(message: str, known_keys: Iterable[str]) -> str:
    """A parser error about unknown keys, with the closest known keys suggested (the parser lists none)."""
    known = list(known_keys)
    hints = []
    for key in unknown_keys(message):
        close = close_keys(key, known)
        if close:
            hints.append(f"{key!r}: did you mean {' or '.join(map(repr, close))}?")
    if not hints:
        return did_you_mean_class(message)
    return f"{message.rstrip()} ({'; '.join(hints)} `guardrl fit --help` lists every option)"


_MISSING_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")


def did_you_mean_class(message: str) -> str:
    """A parser error about a misspelt class_path (`module 'guardrl.policy' has no attribute
    'TinySD3Backbon'`), with the closest public names of that module suggested."""
    import importlib

    match = _MISSING_ATTRIBUTE.search(message)
    if match is None:
        return message
    module_name, name = match.groups()
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a suggestion must never replace the real error
        return message
    public = [n for n in getattr(module, "__all__", dir(module)) if not n.startswith("_")]
    close = difflib.get_close_matches(name, public, n=2, cutoff=0.75)
    if not close:
        return message
    names = " or ".join(repr(f"{module_name}.{c}") for c in close)
    return f"{message.rstrip()}\n  (class_path '{module_name}.{name}': did you mean {names}?)"
