"""FSDP2 DTensor helpers that need no Lightning (guardrl/sharding.py has the strategy; the policy and the
update only need to read whole values)."""

from __future__ import annotations

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a collective for an FSDP2 DTensor; the tensor itself otherwise)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor
