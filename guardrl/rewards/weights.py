"""Reading a reward model's released weights: one state-dict file, checked, and errors that list the keys
that do not fit (the aesthetic MLP, HPSv2.1 and ImageReward load their weights this way)."""

from __future__ import annotations

import os
from typing import Callable

import torch


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.pt/.bin read with `torch.load(weights_only=True)`
    (tensors only, no pickled code); a {"state_dict": ...} wrapper is unwrapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r} (expected a .pth or .safetensors state dict)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def read_tensor_state(path: str, error: Callable[[str], Exception]) -> dict[str, torch.Tensor]:
    """`load_state_dict_file`, with any failure, or a file that is not a dict of tensors, raised as
    `error(message)` (the reward's own error, naming its option)."""
    try:
        state = load_state_dict_file(path)
    except Exception as e:
        raise error(
            f"checkpoint={path!r} could not be read as a state dict ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"checkpoint={path!r} is not a state dict of tensors")
    return state


def few(keys, n: int = 5) -> str:
    """The first n of some keys, sorted, and how many more there are."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def describe_mismatch(missing, unexpected, shapes) -> str:
    """'N missing keys: ...; N unexpected keys: ...; N tensors of other shapes: ...; ' (empty parts left
    out)."""
    return (
        (f"{len(missing)} missing keys: {few(missing)}; " if missing else "")
        + (f"{len(unexpected)} unexpected keys: {few(unexpected)}; " if unexpected else "")
        + (f"{len(shapes)} tensors of other shapes: {few(shapes, 3)}; " if shapes else "")
    )


def resolve_weights_file(checkpoint, names: tuple[str, ...], error: Callable[[str], Exception]) -> str:
    """A released weights file from a reward's `checkpoint` option: the file itself, a directory holding one
    of `names`, or a hub id ("name" or "owner/name") whose repo holds `names[0]`. Anything else that does not
    exist is a wrong path, raised as `error(message)` naming the option and what was tried."""
    if not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint):
        raise error(
            f"checkpoint={checkpoint!r} must be a path to {names[0]}, a directory holding it, or a hub id"
        )
    checkpoint = str(checkpoint)
    if os.path.isfile(checkpoint):
        return checkpoint
    if os.path.isdir(checkpoint):
        for name in names:
            if os.path.isfile(os.path.join(checkpoint, name)):
                return os.path.join(checkpoint, name)
        raise error(
            f"checkpoint={checkpoint!r} is a directory without {' or '.join(names)} "
            f"(it holds: {few(os.listdir(checkpoint)) or 'nothing'})"
        )
    looks_like_path = (
        checkpoint.startswith((".", "/", "~"))
        or checkpoint.count("/") > 1
        or checkpoint.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))
    )
    if looks_like_path:
        raise error(f"checkpoint={checkpoint!r}: no such file or directory")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(checkpoint, names[0])
    except Exception as e:  # offline, unknown repo, missing file
        raise error(
            f"checkpoint={checkpoint!r} is not a local file or directory, and {names[0]} could not be "
            f"fetched from the hub repo of that name ({type(e).__name__}: {e})"
        ) from None
