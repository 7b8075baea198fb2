"""Gradient norms of the trainable parameters: the whole norm (FSDP2 shards gathered) and, for
grpo.log_step_grad_norms, each denoising step's share of a minibatch's gradient."""

from __future__ import annotations

from typing import Optional

import torch

from guardrl.dtensors import full_tensor


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together; 0 when none exists."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [full_tensor(g.detach().float().norm()) for g in grads]  # FSDP2: whole norms of DTensor shards
    return torch.linalg.vector_norm(torch.stack(norms))


def grad_snapshot(params: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Copies of the accumulated gradients, to measure what the next backward adds (`grad_delta_norm`)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def grad_delta_norm(params: list[torch.Tensor], before: list[Optional[torch.Tensor]]) -> float:
    """The norm of what was added to the gradients since `before` (one step's backward)."""
    squares = []
    for p, old in zip(params, before):
        if p.grad is None:
            continue
        delta = p.grad.detach() if old is None else p.grad.detach() - old
        squares.append(full_tensor(delta.float().norm()) ** 2)
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0
