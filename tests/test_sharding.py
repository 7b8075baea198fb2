"""FSDP2 on two CPU processes (gloo), through the real `guardrl fit` with configs/strategy/fsdp.yaml: the
transformer's parameters are sharded, training matches DDP, a run resumes from its sharded checkpoint to the
straight run's weights, and the exported LoRA gives a single-process policy the sharded policy's outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file

from guardrl.sharding import FSDP2Strategy, transformer_blocks
from tests.conftest import REPO_ROOT
from tests.sharding_probe import PROBE_T, probe_inputs

LORA_FILE = os.path.join("lora", "final", "pytorch_lora_weights.safetensors")


def _fit(out, iterations, *extra, ckpt_path=None):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "guardrl.cli",
        "fit",
        "--config",
        "configs/tiny/grpo_guard.yaml",
        *extra,
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--model.max_iterations",
        str(iterations),
        "--data.prompts_per_batch",
        "2",
        "--model.sampling.num_inference_steps",
        "6",
        "--model.rewards",
        '[{"class_path": "tests.sharding_probe.SmoothReward"}]',  # why: sharding_probe.py
        # SGD: its update is linear in the gradient, so float-order differences between the two strategies'
        # reductions stay at float level (Adam's first steps divide by |g| and amplify them in tiny entries)
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer.lr",
        "0.5",
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        "run",
        "--trainer.logger.init_args.version",
        "0",
        "--trainer.callbacks+=guardrl.callbacks.LoraExport",
        "--trainer.callbacks+=tests.sharding_probe.ShardingProbe",
        "--trainer.callbacks.init_args.out",
        str(out / "probe"),
    ]
    if ckpt_path:
        command += ["--ckpt_path", ckpt_path]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return out / "run" / "version_0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    fsdp = ("--config", "configs/strategy/fsdp.yaml")
    return {
        "ddp": _fit(root / "ddp", 3, "--trainer.strategy", "ddp"),
        # compiled from its second iteration on (performance.compile; the eager backend runs the same
        # kernels), so the comparisons below also cover torch.compile over fully_shard'ed blocks
        "fsdp": _fit(
            root / "fsdp",
            3,
            *fsdp,
            "--model.performance.compile",
            "true",
            "--model.performance.compile_backend",
            "eager",
        ),
        "fsdp_first_2": _fit(root / "resumed", 2, *fsdp),
        "root": root,
    }


def _lora(version_dir):
    return load_file(os.path.join(version_dir, LORA_FILE))


def _relative_difference(a, b):
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a)
    den = sum((a[k].double() ** 2).sum() for k in a)
    return float((num / den).sqrt())


@pytest.mark.slow
def test_each_rank_holds_half_of_every_transformer_parameter(runs):
    records = []
    for rank in (0, 1):
        with open(runs["fsdp"].parent.parent / "probe" / f"rank{rank}.json") as f:
            records.append(json.load(f))
    for record in records:
        # every parameter of the transformer is a DTensor shard, the LoRA adapters included
        assert record["sharded"] == record["parameters"] > 0
        assert record["trainable_sharded"] == 16  # the policy adapter's A and B of 8 linear layers
    # dim-0 sharding over 2 ranks: the two local shards add up to the whole
    assert records[0]["local_numel"] + records[1]["local_numel"] == records[0]["full_numel"]
    assert records[0]["local_numel"] < records[0]["full_numel"]
    # the checkpoint is a directory of per-rank shards
    last = runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_fsdp2_trains_what_ddp_trains(runs):
    ddp, fsdp = _lora(runs["ddp"]), _lora(runs["fsdp"])
    assert ddp.keys() == fsdp.keys()
    trained_b = {k: v for k, v in ddp.items() if "lora_B" in k}
    assert all(v.abs().max() > 0 for v in trained_b.values())  # lora_B starts at zero: it was trained
    # 3 iterations x 2 inner epochs of SGD with gradient clipping and the KL reference forward: the same
    # weights up to the order of floating-point reductions
    assert _relative_difference(ddp, fsdp) < 1e-5
    # ... with the FSDP2 run's transformer compiled (iterations 2 and 3), the DDP run's not
    probes = {
        name: torch.load(runs[name].parent.parent / "probe" / "velocity.pt") for name in ("ddp", "fsdp")
    }
    assert (probes["ddp"]["compiled"], probes["fsdp"]["compiled"]) == (False, True)


@pytest.mark.slow
def test_resume_from_the_sharded_checkpoint_gives_the_straight_runs_weights(runs):
    checkpoint = str(runs["fsdp_first_2"] / "checkpoints" / "last.ckpt")
    root = runs["root"] / "resumed"
    resumed = _fit(root, 3, "--config", "configs/strategy/fsdp.yaml", ckpt_path=checkpoint)
    straight, continued = _lora(runs["fsdp"]), _lora(resumed)
    assert all(torch.equal(straight[k], continued[k]) for k in straight)
    # the resumed run replaced its last.ckpt (both ranks write a hidden sibling, rank 0 swaps it in): the new
    # one is in place, whole, and nothing temporary is left beside it
    checkpoints = resumed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []
    last = checkpoints / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert torch.load(last / "meta.pt", weights_only=True)["guardrl"]["num_iterations"] == 3


@pytest.mark.slow
def test_exported_lora_gives_a_single_process_policy_the_sharded_policys_velocity(runs):
    from guardrl.policy import TinySD3Backbone

    sharded_velocity = torch.load(runs["fsdp"].parent.parent / "probe" / "velocity.pt")["velocity"]
    backbone = TinySD3Backbone(seed=0)
    backbone.load()
    latents, cond = probe_inputs(backbone, torch.device("cpu"))
    with torch.no_grad():
        base = backbone.velocity(latents, PROBE_T, cond, 1.0)
        backbone.pipeline.load_lora_weights(str(runs["fsdp"] / "lora" / "final"))
        loaded = backbone.velocity(latents, PROBE_T, cond, 1.0)
    torch.testing.assert_close(loaded, sharded_velocity, rtol=0, atol=1e-6)
    assert (base - sharded_velocity).abs().max() > 1e-4  # the trained LoRA changes the output


def test_fsdp2_strategy_fixes_the_mesh_and_blocks_are_found():
    strategy = FSDP2Strategy()
    assert isinstance(strategy, ModelParallelStrategy)
    with pytest.raises(ValueError, match=r"trainer\.strategy\.tensor_parallel_size: FSDP2Strategy sets it"):
        FSDP2Strategy(tensor_parallel_size=2)
    from guardrl.policy import TinyFluxBackbone, TinySD3Backbone

    for backbone, count in ((TinySD3Backbone(seed=0), 2), (TinyFluxBackbone(seed=0), None)):
        backbone.load()
        blocks = transformer_blocks(backbone.transformer, backbone.shard_block_names)
        expected = count or len(backbone.transformer.transformer_blocks) + len(
            backbone.transformer.single_transformer_blocks
        )
        assert len(blocks) == expected
    with pytest.raises(ValueError, match=r"Linear has no block list \['transformer_blocks'\]"):
        transformer_blocks(torch.nn.Linear(2, 2), ("transformer_blocks",))


@pytest.mark.slow
def test_lora_export_from_the_sharded_checkpoint_in_one_process(runs, tmp_path):
    from guardrl.export import export_from_checkpoint

    version_dir = runs["fsdp"]
    path = export_from_checkpoint(
        str(version_dir / "config.yaml"),
        str(version_dir / "checkpoints" / "last.ckpt"),
        str(tmp_path / "lora"),
    )
    from_checkpoint, from_run = load_file(path), _lora(version_dir)
    assert from_checkpoint.keys() == from_run.keys()
    assert all(torch.equal(from_checkpoint[k], from_run[k]) for k in from_run)
