"""Atomic writes for the toy world's artefacts (weights, configs, records): write `<path>.tmp`, then
`os.replace` onto the target, so a reader (or a run killed mid-write) never sees half a file."""

from __future__ import annotations

import json
import os

import torch


def write_json_atomic(path: str, obj) -> str:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def save_safetensors_atomic(path: str, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.chmod(path + ".tmp", 0o644)  # safetensors writes 0600; shipped weights must be readable by all
    os.replace(path + ".tmp", path)
    return path
