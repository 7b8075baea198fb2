"""FSDP2 for the policy: Lightning's `ModelParallelStrategy` hands the module a device mesh, and
`shard_policy` applies `torch.distributed.fsdp.fully_shard` to every transformer block, then to the root.

    trainer:
      strategy: guardrl.sharding.FSDP2Strategy     # configs/strategy/fsdp.yaml

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with the mesh guardrl wants: every process data
parallel (data_parallel_size = nodes x devices), no tensor parallelism; Lightning's own "auto" would make
the devices of a node tensor-parallel. A plain ModelParallelStrategy with tensor_parallel_size 1 works the
same (docs/scale.md). Why per block: FSDP2 all-gathers one `fully_shard` unit's
parameters at a time, so a block is the granule of peak memory; the root unit holds what is left (patch and
time embeddings, norms, the output projection). With LoRA the adapters live inside the blocks' linear layers,
so the policy, old-policy and EMA adapters shard with their block, in float32 even when the base is bf16
(FSDP2 all-gathers each dtype separately). The frozen text encoders and VAE are not sharded: they run
without grad, replicated.

Under FSDP2 the parameters are DTensors: `full_tensor` gathers one on every rank (a collective, so every
rank must call it in the same order); the LoRA export and the gradient norms use it.

A sharded checkpoint is a directory; `FSDP2Strategy.save_checkpoint` writes it beside its target and swaps it
in, so a run killed while saving leaves the previous checkpoint whole (docs/reliability.md).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from guardrl.checkpointing import fsync_directory

# Lightning's names in a distributed checkpoint: the module's state under "state_dict", the rest in meta.pt.
MODEL_KEY = "state_dict"
DISTRIBUTED_METADATA = "meta.pt"
# Siblings of a sharded checkpoint `<dir>/<name>` while it is replaced: `.<name>.writing` (the new one being
# written) and `.<name>.previous` (the old one, renamed aside for a moment). Hidden and not ending in ".ckpt",
# so neither ModelCheckpoint (which lists `*.ckpt`) nor `--ckpt_path last` (which looks for `last.ckpt`) takes
# them for a checkpoint.
WRITING_SUFFIX = ".writing"
PREVIOUS_SUFFIX = ".previous"


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with data_parallel_size = world size and tensor_parallel_size = 1."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        for fixed in ("data_parallel_size", "tensor_parallel_size"):
            if fixed in kwargs:
                raise ValueError(
                    f"trainer.strategy.{fixed}: FSDP2Strategy sets it (all processes data parallel, "
                    "no tensor parallelism); "
                    "use lightning.pytorch.strategies.ModelParallelStrategy to choose the mesh"
                )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # The world size is known only once the launcher has set up the processes (nodes x devices).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None
    ) -> None:
        """Write a sharded checkpoint so that `filepath` always holds a complete one, the previous or the new.

        Lightning writes the shards straight into `filepath`, so a kill midway leaves a half-written directory
        in place of the previous checkpoint. Here every rank writes into `.<name>.writing` beside it, and once
        all have finished rank 0 swaps it in (`swap_in`). The barriers keep ranks from writing into a
        directory rank 0 is still clearing, and from returning before the swap. Single-file checkpoints
        (save_distributed_checkpoint False) go through Lightning and the CheckpointIO (AtomicCheckpointIO).
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            prepare_write(path)
        self.barrier("FSDP2Strategy.save_checkpoint: prepared")
        super().save_checkpoint(checkpoint, writing_path(path), storage_options)
        self.barrier("FSDP2Strategy.save_checkpoint: written")
        if self.is_global_zero:
            swap_in(writing_path(path), path)
        self.barrier("FSDP2Strategy.save_checkpoint: swapped")

    def remove_checkpoint(self, filepath) -> None:
        """Remove a checkpoint (ModelCheckpoint dropping an old top-k one), with the leftovers of an
        interrupted write of it, which no later save of that name would clear."""
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_path(writing_path(Path(filepath)))
            remove_path(previous_path(Path(filepath)))

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a sharded checkpoint that holds only the trainable state.

        guardrl's checkpoints leave out the frozen base weights (GRPOModule.on_save_checkpoint), and
        Lightning's loader asks torch.distributed.checkpoint for the whole model, which then fails on the
        first frozen key. This loads exactly the trainable keys (after checking them against the checkpoint,
        with the same error as a single-file resume), then the optimizer state, and returns the rest
        (counters, RNG states, loops).
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.is_global_zero:
            restore_interrupted_swap(path)  # a save killed between its two renames left no `path`
        self.barrier("FSDP2Strategy.load_checkpoint: restored")
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
        module.check_checkpoint_state(saved_model_tensors(str(path), device="meta"))
        model_state = {
            key: value
            for key, value in get_model_state_dict(self.model).items()
            if module.is_trainable_key(key)
        }
        load({MODEL_KEY: model_state}, checkpoint_id=path)
        self.model.load_state_dict(model_state, strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optimizer_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(path / DISTRIBUTED_METADATA, weights_only=weights_only)


def is_checkpoint(path: str) -> bool:
    """A single-file checkpoint, or a sharded (FSDP2) one: a directory of per-rank shards plus meta.pt, which
    holds everything else, the guardrl counters included. A sharded one whose replacement was killed between
    its two renames is restored first (every reader, `--ckpt_path` and the LoRA export, asks this before
    reading); the temporary siblings of a save are never checkpoints, even when complete."""
    if is_temporary(path):
        return False
    restore_interrupted_swap(path)
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, DISTRIBUTED_METADATA))


def writing_path(path: Path) -> Path:
    """Where a sharded checkpoint is written before it is swapped in (same directory: a rename stays
    atomic)."""
    return path.with_name(f".{path.name}{WRITING_SUFFIX}")


def previous_path(path: Path) -> Path:
    """Where the old checkpoint waits between the two renames of `swap_in`."""
    return path.with_name(f".{path.name}{PREVIOUS_SUFFIX}")


def is_temporary(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    return name.startswith(".") and name.endswith((WRITING_SUFFIX, PREVIOUS_SUFFIX))


def prepare_write(path: Path) -> None:
    """Rank 0, before the ranks write: finish a swap a killed run left half done (so its old checkpoint is not
    deleted below as a leftover), then clear what a killed save left: a partial `.writing` (it may hold
    another world size's shard files, which would otherwise end up in the new checkpoint) and a stale
    `.previous`."""
    restore_interrupted_swap(path)
    remove_path(writing_path(path))
    remove_path(previous_path(path))


def swap_in(writing: Path, path: Path) -> None:
    """Rank 0, once every rank has written `writing`: make it durable, then put it at `path`.

    POSIX rename cannot replace a non-empty directory. Where the kernel and file system can exchange two
    paths atomically (Linux renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs), `path` is never missing.
    Elsewhere (NFS, other systems) the old `path` is renamed to `.<name>.previous` first: a kill between the
    two renames leaves no `path` but a complete `.previous`, which `restore_interrupted_swap` puts back (the
    swap takes effect at the second rename).
    """
    fsync_tree(writing)
    if os.path.lexists(path) and exchange_paths(writing, path):
        fsync_directory(str(path.parent))
        remove_path(writing)  # now the old checkpoint
        return
    previous = previous_path(path)
    if os.path.lexists(path):
        os.rename(path, previous)
    os.rename(writing, path)
    fsync_directory(str(path.parent))  # both renames on disk before the old copy goes
    remove_path(previous)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the C
    library, kernel or file system lacks it, for the caller to fall back to renames."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {a} and {b}: {os.strerror(code)}")


_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # no C library to load this way (Windows)
        return None


def restore_interrupted_swap(path) -> None:
    """Undo a `swap_in` killed between its two renames: `path` missing, the old checkpoint complete in
    `.<name>.previous`. The new one in `.writing` is not trusted (the swap never took effect) and is cleared
    by the next save. Several processes of one job may call this at once: only one rename succeeds."""
    path = Path(path)
    previous = previous_path(path)
    if os.path.lexists(path) or not (previous / DISTRIBUTED_METADATA).is_file():
        return
    try:
        os.rename(previous, path)
    except FileNotFoundError:  # another process restored it first
        return
    fsync_directory(str(path.parent))


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories. torch.distributed.checkpoint fsyncs the shard
    files each rank writes, but not Lightning's meta.pt (rank 0's torch.save)."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(root)


def remove_path(path: Path) -> None:
    """Remove a file, symlink (not its target) or directory tree; nothing if absent."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def load_sharded_trainable_state(module, path: str) -> dict[str, torch.Tensor]:
    """The trainable tensors of a sharded checkpoint, whole, in one process (torch.distributed.checkpoint
    reads every rank's shards when no process group is running): for LoRA export from an FSDP2 run."""
    from torch.distributed.checkpoint import load

    state = {
        key: t for key, t in saved_model_tensors(path, device="cpu").items() if module.is_trainable_key(key)
    }
    load({MODEL_KEY: state}, checkpoint_id=path)
    return state


def saved_model_tensors(path: str, device: str) -> dict[str, torch.Tensor]:
    """Empty tensors of the shapes and dtypes the sharded checkpoint holds for the module, by state_dict key
    ("meta": to check keys and shapes without memory; "cpu": buffers for torch.distributed.checkpoint to
    fill)."""
    from torch.distributed.checkpoint import FileSystemReader

    return {
        key[len(MODEL_KEY) + 1 :]: torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
        for key, meta in FileSystemReader(path).read_metadata().state_dict_metadata.items()
        if key.startswith(MODEL_KEY + ".") and hasattr(meta, "size")
    }


def transformer_blocks(transformer: nn.Module, block_names: tuple[str, ...]) -> list[nn.Module]:
    """The transformer's repeated blocks, the units FSDP2 shards one by one: the ModuleLists the backbone
    names in `FlowBackbone.shard_block_names`."""
    blocks: list[nn.Module] = []
    missing = [
        name for name in block_names if not isinstance(getattr(transformer, name, None), nn.ModuleList)
    ]
    if missing or not block_names:
        raise ValueError(
            f"{type(transformer).__name__} has no block list {missing or list(block_names)}: the backbone's "
            "shard_block_names must name the transformer's ModuleLists of blocks, or FSDP2 cannot shard it"
        )
    for name in block_names:
        blocks.extend(getattr(transformer, name))
    return blocks


def shard_transformer(
    transformer: nn.Module, block_names: tuple[str, ...], mesh, reshard_after_forward: bool = True
) -> int:
    """fully_shard each block, then the root; returns the number of blocks."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(transformer, block_names)
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
            f"trainer.strategy.tensor_parallel_size={tensor_parallel}: "
            "guardrl shards the transformer with FSDP2 only (no tensor-parallel plan); "
            "allowed: 1, with data_parallel_size = the number of devices"
        )
    return device_mesh["data_parallel"]


def shard_policy(policy, device_mesh, reshard_after_forward: Optional[bool] = True) -> dict[str, int]:
    """Shard the trained transformer, and with full fine-tuning its old / EMA / reference copies."""
    mesh = data_parallel_mesh(device_mesh)
    names = policy.backbone.shard_block_names
    sharded = {"transformer": shard_transformer(policy.transformer, names, mesh, reshard_after_forward)}
    for name, copy in policy.transformer_copies().items():
        sharded[f"{name}_transformer"] = shard_transformer(copy, names, mesh, reshard_after_forward)
    return sharded
