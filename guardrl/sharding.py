"""FSDP2 for the policy: Lightning's `ModelParallelStrategy` hands the module a device mesh, and
`shard_policy` applies `torch.distributed.fsdp.fully_shard` to every transformer block, then to the root.

    trainer:
      strategy: guardrl.sharding.FSDP2Strategy     # configs/strategy/fsdp.yaml

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with the mesh guardrl wants: every process data
parallel (data_parallel_size = nodes x devices), no tensor parallelism; Lightning's own "auto" would make
the devices of a node tensor-parallel. A plain ModelParallelStrategy with tensor_parallel_size 1 works the same
(docs/scale.md). Why per block: FSDP2 all-gathers one `fully_shard` unit's
parameters at a time, so a block is the granule of peak memory; the root unit holds what is left (patch and
time embeddings, norms, the output projection). With LoRA the adapters live inside the blocks' linear layers,
so the policy, old-policy and EMA adapters shard with their block, in float32 even when the base is bf16
(FSDP2 all-gathers each dtype separately). The frozen text encoders and VAE are not sharded: they run
without grad, replicated.

Under FSDP2 the parameters are DTensors: `full_tensor` gathers one on every rank (a collective, so every
rank must call it in the same order); the LoRA export and the gradient norms use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

# Lightning's names in a distributed checkpoint: the module's state under "state_dict", the rest in meta.pt.
MODEL_KEY = "state_dict"
DISTRIBUTED_METADATA = "meta.pt"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # SD3 / Flux double blocks; Flux single


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with data_parallel_size = world size and tensor_parallel_size = 1."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        for fixed in ("data_parallel_size", "tensor_parallel_size"):
            if fixed in kwargs:
                raise ValueError(
                    f"trainer.strategy.{fixed}: FSDP2Strategy sets it (all processes data parallel, no tensor "
                    "parallelism); use lightning.pytorch.strategies.ModelParallelStrategy to choose the mesh"
                )
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # The world size is known only once the launcher has set up the processes (nodes x devices).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a sharded checkpoint that holds only the trainable state.

        guardrl's checkpoints leave out the frozen base weights (GRPOModule.on_save_checkpoint), and Lightning's
        loader asks torch.distributed.checkpoint for the whole model, which then fails on the first frozen key.
        This loads exactly the trainable keys (after checking them against the checkpoint, with the same error
        as a single-file resume), then the optimizer state, and returns the rest (counters, RNG states, loops).
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.lightning_module
        module._check_checkpoint_state(saved_model_tensors(str(path), device="meta"))
        model_state = {
            key: value for key, value in get_model_state_dict(self.model).items() if module._is_trainable_key(key)
        }
        load({MODEL_KEY: model_state}, checkpoint_id=path)
        self.model.load_state_dict(model_state, strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optimizer_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(path / DISTRIBUTED_METADATA, weights_only=weights_only)


def is_checkpoint(path: str) -> bool:
    """A single-file checkpoint, or a sharded (FSDP2) one: a directory of per-rank shards plus meta.pt, which
    holds everything else, the guardrl counters included."""
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, DISTRIBUTED_METADATA))


def load_sharded_trainable_state(module, path: str) -> dict[str, torch.Tensor]:
    """The trainable tensors of a sharded checkpoint, whole, in one process (torch.distributed.checkpoint
    reads every rank's shards when no process group is running): for LoRA export from an FSDP2 run."""
    from torch.distributed.checkpoint import load

    state = {key: t for key, t in saved_model_tensors(path, device="cpu").items() if module._is_trainable_key(key)}
    load({MODEL_KEY: state}, checkpoint_id=path)
    return state


def saved_model_tensors(path: str, device: str) -> dict[str, torch.Tensor]:
    """Empty tensors of the shapes and dtypes the sharded checkpoint holds for the module, by state_dict key
    ("meta": to check keys and shapes without memory; "cpu": buffers for torch.distributed.checkpoint to fill)."""
    from torch.distributed.checkpoint import FileSystemReader

    return {
        key[len(MODEL_KEY) + 1:]: torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
        for key, meta in FileSystemReader(path).read_metadata().state_dict_metadata.items()
        if key.startswith(MODEL_KEY + ".") and hasattr(meta, "size")
    }


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks, the units FSDP2 shards one by one."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise ValueError(
            f"{type(transformer).__name__} has none of {BLOCK_LISTS}: guardrl does not know its blocks, so it "
            "cannot shard it with FSDP2"
        )
    return blocks


def shard_transformer(transformer: nn.Module, mesh, reshard_after_forward: bool = True) -> int:
    """fully_shard each block, then the root; returns the number of blocks."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(transformer)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(blocks)


def data_parallel_mesh(device_mesh):
    """The 1-D data-parallel mesh of a ModelParallelStrategy's 2-D mesh; only tensor_parallel_size=1 is
    supported (guardrl has no tensor-parallel plan for the diffusion transformers)."""
    tensor_parallel = device_mesh["tensor_parallel"].size()
    if tensor_parallel != 1:
        raise ValueError(
            f"trainer.strategy.tensor_parallel_size={tensor_parallel}: guardrl shards the transformer with FSDP2 "
            "only (no tensor-parallel plan); allowed: 1, with data_parallel_size = the number of devices"
        )
    return device_mesh["data_parallel"]


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a collective for an FSDP2 DTensor; the tensor itself otherwise)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_policy(policy, device_mesh, reshard_after_forward: Optional[bool] = True) -> dict[str, int]:
    """Shard the trained transformer, and with full fine-tuning its old / EMA / reference copies."""
    mesh = data_parallel_mesh(device_mesh)
    sharded = {"transformer": shard_transformer(policy.transformer, mesh, reshard_after_forward)}
    for name in ("old_transformer", "ema_transformer", "reference_transformer"):
        copy = getattr(policy, name, None)
        if copy is not None:
            sharded[name] = shard_transformer(copy, mesh, reshard_after_forward)
    return sharded
