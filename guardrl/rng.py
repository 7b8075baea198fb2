"""Every random number generator a run touches, captured and restored as tensors.

guardrl draws its rollout noise and its timestep/minibatch choices from generators seeded by
(seed, iteration, rank), so those need no saved state. What does: LoRA dropout and anything else that uses
the global torch generators, numpy and Python's `random` (used by user rewards and the prompt shuffle of
third-party code). Lightning checkpoints none of them. The states are stored as tensors and plain Python
numbers so that `torch.load(..., weights_only=True)` can read the checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    version, mt_state, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"])
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            # A different GPU count: the per-device streams cannot map one to one; keep the fresh ones.
            return
        torch.cuda.set_rng_state_all(cuda_states)


def capture_rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """Each rank's states, gathered on every rank (the checkpoint is written by rank zero alone)."""
    own = capture_rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [own]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, own)
    return gathered


def restore_rng_state_of_rank(states: list[dict[str, Any]], rank: int, world_size: int) -> bool:
    """Restore this rank's states; False (nothing restored) when the checkpoint came from another world
    size."""
    if len(states) != world_size:
        return False
    restore_rng_state(states[rank])
    return True
