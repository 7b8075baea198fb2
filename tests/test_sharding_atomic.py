"""Sharded (FSDP2) checkpoints are replaced atomically: `FSDP2Strategy.save_checkpoint` has every rank write
into `.<name>.writing` beside the checkpoint and swaps it in, so `<name>` always holds a complete checkpoint.

One process, real torch.distributed.checkpoint writes (it needs no process group, and the strategy's barriers
and broadcasts pass through without one), read back the way a resume reads them
(`FSDP2Strategy.load_checkpoint`). The 2-process training runs of tests/test_sharding.py go through the same
save with two ranks.
"""

import os

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

import guardrl.sharding as sharding
from guardrl.checkpointing import AtomicCheckpointIO
from guardrl.cli import _find_last_checkpoint
from guardrl.sharding import FSDP2Strategy, exchange_paths, is_checkpoint, previous_path, writing_path

# torch.distributed.checkpoint says so on every single-process save and load.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

SHARD_FILES = [".metadata", "__0_0.distcp", "meta.pt"]


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, so the files stay as a killed process leaves them."""


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this (simulated failure while writing meta.pt)")


class _Module:
    """The two things FSDP2Strategy.load_checkpoint asks of the GRPOModule."""

    def check_checkpoint_state(self, saved):
        assert sorted(saved) == ["bias", "weight"]

    def is_trainable_key(self, key):
        return True


def _trained(version: int):
    """A linear layer and its SGD-momentum optimizer after one step; every value depends on `version`."""
    torch.manual_seed(version)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(path, version: int, **extra):
    """Save what Lightning hands the strategy (sharded state dicts, counters) at `path`; returns the saved
    model and optimizer."""
    model, optimizer = _trained(version)
    checkpoint = {
        "state_dict": get_model_state_dict(model),
        "optimizer_states": [
            get_optimizer_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True))
        ],
        "guardrl": {"num_iterations": version},
        **extra,
    }
    FSDP2Strategy().save_checkpoint(checkpoint, path)
    return model, optimizer


def _assert_holds(path, version: int) -> None:
    """`path` loads, as a resume loads it, to exactly the weights, momentum and counter saved as `version`."""
    expected_model, expected_optimizer = _trained(version)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = FSDP2Strategy()
    strategy._lightning_module, strategy.model, strategy.optimizers = _Module(), model, [optimizer]
    meta = strategy.load_checkpoint(path)
    assert meta["guardrl"] == {"num_iterations": version}
    for (name, want), got in zip(expected_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), name
    want_state, got_state = expected_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert sorted(got_state) == sorted(want_state) == [0, 1]
    for index in want_state:
        assert torch.equal(got_state[index]["momentum_buffer"], want_state[index]["momentum_buffer"]), index


def _entries(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _resolved_last(directory) -> tuple:
    """What `--ckpt_path last` (checkpoint.dirpath set) and Lightning's ModelCheckpoint take for
    checkpoints."""
    config = Namespace(checkpoint=Namespace(dirpath=str(directory)))
    lightning = ModelCheckpoint(dirpath=str(directory))._find_last_checkpoints(trainer=None)
    return _find_last_checkpoint(config, None), sorted(lightning)


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch, tmp_path):
    """Both ways `swap_in` replaces a checkpoint: one atomic exchange (Linux renameat2) or, where the file
    system lacks it, two renames."""
    if request.param == "exchange":
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        if not exchange_paths(tmp_path / "a", tmp_path / "b"):
            pytest.skip(f"renameat2(RENAME_EXCHANGE) is not supported on the file system of {tmp_path}")
        os.rmdir(tmp_path / "a"), os.rmdir(tmp_path / "b")
    else:
        monkeypatch.setattr(sharding, "exchange_paths", lambda a, b: False)
    return request.param


def _fail_in_the_second_tensor(monkeypatch):
    from torch.distributed.checkpoint import filesystem

    real, calls = filesystem._write_item, []

    def write_item(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device (simulated, in the middle of the shard file)")
        return real(*args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", write_item)


@pytest.mark.parametrize("where", ["shard file", "meta.pt"])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    assert not torch.equal(_trained(1)[0].weight, _trained(2)[0].weight)  # the two versions differ
    if where == "shard file":
        with monkeypatch.context() as patch:
            _fail_in_the_second_tensor(patch)
            with pytest.raises(CheckpointException, match="No space left on device"):
                _save(path, 2)
    else:
        with pytest.raises(RuntimeError, match="cannot pickle this"):
            _save(path, 2, callbacks=_Unpicklable())
    assert _entries(tmp_path) == [".last.ckpt.writing", "last.ckpt"]
    partial = _entries(writing_path(path))
    assert "__0_0.distcp" in partial and ("meta.pt" in partial) == (where == "meta.pt")
    assert not is_checkpoint(str(writing_path(path)))  # even with a meta.pt in it
    assert _resolved_last(tmp_path) == (str(path), [str(path)])
    _assert_holds(path, 1)


def test_a_save_replaces_the_checkpoint_and_leaves_nothing_beside_it(tmp_path, monkeypatch, swap):
    renames, real_rename = [], os.rename

    def rename(source, target):
        renames.append(os.path.basename(target))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    assert _entries(tmp_path) == ["last.ckpt"]
    _save(path, 2)
    assert _entries(tmp_path) == ["last.ckpt"] and _entries(path) == SHARD_FILES
    # the exchange never leaves `last.ckpt` missing: nothing is renamed aside
    assert (".last.ckpt.previous" in renames) == (swap == "two renames")
    _assert_holds(path, 2)


def test_a_sharded_save_replaces_a_single_file_checkpoint(tmp_path, swap):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"an older single-file checkpoint")
    _save(path, 3)
    assert _entries(tmp_path) == ["last.ckpt"] and _entries(path) == SHARD_FILES
    _assert_holds(path, 3)


def _kill_between_the_two_renames(monkeypatch, path):
    real_rename = os.rename

    def rename(source, target):
        if os.fspath(source) == os.fspath(writing_path(path)):
            raise _Killed()
        real_rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(sharding, "exchange_paths", lambda a, b: False)
        patch.setattr(os, "rename", rename)
        with pytest.raises(_Killed):
            _save(path, 2)


@pytest.mark.parametrize(
    "reader", ["is_checkpoint", "--ckpt_path last", "load_checkpoint", "the next save, which fails"]
)
def test_a_save_killed_between_the_two_renames_is_undone(tmp_path, monkeypatch, reader):
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    _kill_between_the_two_renames(monkeypatch, path)
    # no last.ckpt; the old checkpoint aside, the new one complete but never swapped in
    assert _entries(tmp_path) == [".last.ckpt.previous", ".last.ckpt.writing"]
    assert _entries(writing_path(path)) == SHARD_FILES and not is_checkpoint(str(writing_path(path)))
    if reader == "is_checkpoint":  # what `--ckpt_path <path>` and the LoRA export ask first
        assert is_checkpoint(str(path))
    elif reader == "--ckpt_path last":
        assert _find_last_checkpoint(Namespace(checkpoint=Namespace(dirpath=str(tmp_path))), None) == str(
            path
        )
    elif reader == "the next save, which fails":  # it must restore the old one before clearing leftovers
        with pytest.raises(RuntimeError, match="cannot pickle this"):
            _save(path, 3, callbacks=_Unpicklable())
    # the swap takes effect at the second rename: before it, the checkpoint is the previous one
    _assert_holds(path, 1)  # for "load_checkpoint", this load is what restores it
    assert _entries(tmp_path) == [".last.ckpt.writing", "last.ckpt"]
    _save(path, 3)
    assert _entries(tmp_path) == ["last.ckpt"]
    _assert_holds(path, 3)


def test_ckpt_path_last_under_a_logger_finds_a_swap_killed_between_the_renames(tmp_path, monkeypatch):
    # without checkpoint.dirpath, `--ckpt_path last` searches <save_dir>/<name>/version_*/checkpoints/
    older, newer = (tmp_path / "run" / f"version_{v}" / "checkpoints" for v in (0, 1))
    older.mkdir(parents=True)
    newer.mkdir(parents=True)
    _save(older / "last.ckpt", 1)
    _save(newer / "last.ckpt", 2)
    _kill_between_the_two_renames(monkeypatch, newer / "last.ckpt")
    assert _entries(newer) == [".last.ckpt.previous", ".last.ckpt.writing"]
    found = _find_last_checkpoint(Namespace(), Namespace(save_dir=str(tmp_path), name="run"))
    assert found == str(newer / "last.ckpt")  # the newest version, restored; not version_0
    _assert_holds(newer / "last.ckpt", 2)


def test_two_processes_restoring_at_once_both_see_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    _kill_between_the_two_renames(monkeypatch, path)
    real_rename = os.rename

    def other_process_first(source, target):
        real_rename(source, target)  # the other process's rename wins the race
        raise FileNotFoundError(2, "No such file or directory", os.fspath(source))

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", other_process_first)
        assert is_checkpoint(str(path))
    _assert_holds(path, 1)


def test_leftovers_of_a_killed_run_do_not_disturb_the_next_save(tmp_path, swap):
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    # killed while writing, with another world size: a partial directory with a shard file of rank 1
    writing_path(path).mkdir()
    (writing_path(path) / "__1_0.distcp").write_bytes(b"\x00" * 64)
    (writing_path(path) / "meta.pt").write_bytes(b"trunc")
    # killed after a swap by renames, before the old copy was deleted
    previous_path(path).mkdir()
    (previous_path(path) / "meta.pt").write_bytes(b"an old checkpoint")
    # killed while writing a periodic checkpoint that was never completed
    writing_path(tmp_path / "iteration=4.ckpt").mkdir()
    assert _resolved_last(tmp_path) == (str(path), [str(path)])
    _assert_holds(path, 1)
    _save(path, 2)
    _save(tmp_path / "iteration=4.ckpt", 4)
    assert _entries(tmp_path) == ["iteration=4.ckpt", "last.ckpt"]
    assert _entries(path) == SHARD_FILES  # rank 1's stale shard was not carried into the new checkpoint
    _assert_holds(path, 2)
    _assert_holds(tmp_path / "iteration=4.ckpt", 4)


def test_removing_a_checkpoint_removes_the_leftovers_of_its_writes(tmp_path):
    old, last = tmp_path / "iteration=2.ckpt", tmp_path / "last.ckpt"
    _save(old, 2)
    _save(last, 2)
    writing_path(old).mkdir()
    previous_path(old).mkdir()
    writing_path(last).mkdir()
    FSDP2Strategy().remove_checkpoint(str(old))  # ModelCheckpoint dropping an old top-k checkpoint
    assert _entries(tmp_path) == [".last.ckpt.writing", "last.ckpt"]


def test_single_file_checkpoints_are_saved_as_before(tmp_path):
    strategy = FSDP2Strategy(save_distributed_checkpoint=False)
    strategy.checkpoint_io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "guardrl": {"num_iterations": 5}}, path)
    assert _entries(tmp_path) == ["last.ckpt"] and path.is_file()
    saved = torch.load(path, weights_only=True)
    assert saved["guardrl"] == {"num_iterations": 5} and torch.equal(
        saved["state_dict"]["w"], torch.arange(3.0)
    )
