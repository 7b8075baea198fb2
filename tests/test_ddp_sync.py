"""Issue 20, item 4: under DDP the update all-reduces the gradients once per optimizer step (in the last
backward before it), not in every backward, and trains the same weights.

Two processes on CPU (gloo) through the real `guardrl fit`. `AllReduceCounter` (a callback the subprocesses
load from this file) counts DDP's gradient all-reduces with a comm hook, the one place every bucket
reduction of the reducer goes through (the reducer calls the process group from C++, so wrapping
`torch.distributed.all_reduce` would see none of them), and saves the trained adapter.

The run: 2 ranks x 2 prompts x 4 samples = 8 samples per rank, minibatches of 4, 2 inner epochs: 4 minibatch
updates per iteration; 3 trained steps each: 12 backwards; gradient_accumulation_steps 2: 2 optimizer steps.
"""

import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy

import guardrl.update
from tests.conftest import REPO_ROOT

TRAINED_STEPS = 3
MINIBATCHES = 4  # per iteration: 2 inner epochs x (8 samples / 4)
OPTIMIZER_STEPS = 2  # per iteration: 4 minibatches / gradient_accumulation_steps 2
ITERATIONS = 2
FIRST_BUCKET_BYTES = 1024 * 1024  # DDP's first bucket (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES)


class AllReduceCounter(Callback):
    """Counts gradient all-reduces per iteration on this rank; saves them with the adapter after each
    iteration.

    `sync_every_backward` sets guardrl.update's internal switch in every process of the run (the CLI builds
    the callbacks in each), to run the previous behaviour for comparison."""

    def __init__(self, out: str, sync_every_backward: bool = False) -> None:
        self.out = out
        self.calls = 0
        self.per_iteration: list[int] = []
        self.adapters: list[dict[str, torch.Tensor]] = []  # after each iteration
        self._at_start = 0
        guardrl.update._SYNC_EVERY_BACKWARD = sync_every_backward

    def _hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls += 1
        # DDP's own reduction (mean over ranks), so that the counted run trains what an uncounted one does
        return allreduce_hook(state, bucket)

    def on_train_start(self, trainer, pl_module) -> None:
        # before the first backward, as register_comm_hook requires
        trainer.strategy.model.register_comm_hook(None, self._hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._at_start = self.calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.per_iteration.append(self.calls - self._at_start)
        trained = pl_module.policy.named_weight_set("policy")
        self.adapters.append({name: p.detach().clone() for name, p in trained.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out, exist_ok=True)
        torch.save(
            {"all_reduces": self.per_iteration, "adapters": self.adapters},
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


def fit_two_ranks(out, *extra: str) -> list[dict]:
    """A 2-process DDP `guardrl fit` on the tiny SD3 model; each rank's AllReduceCounter record."""
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
        *fit_arguments(out),
        *extra,
    ]
    # A deadlock (one rank syncing, the other not) shows up as the timeout, not as a hung test suite.
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(os.path.join(out, "counter", f"rank{r}.pt"), weights_only=True) for r in (0, 1)]


def fit_arguments(out) -> list[str]:
    """The run of the module docstring, its files under `out`."""
    return [
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--model.max_iterations",
        str(ITERATIONS),
        "--data.prompts_per_batch",
        "2",
        "--model.sampling.num_inference_steps",
        "6",
        "--model.grpo.num_train_timesteps",
        str(TRAINED_STEPS),
        "--model.grpo.minibatch_size",
        "4",
        "--model.grpo.gradient_accumulation_steps",
        "2",
        # A reward that is smooth in the pixels and SGD, whose step is linear in the gradient: a float-order
        # difference in the gradients stays one in the weights (tests/sharding_probe.py; JPEG sizes and
        # Adam's first steps amplify them).
        "--model.rewards",
        '[{"class_path": "tests.sharding_probe.SmoothReward"}]',
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer.lr",
        "0.5",
        # no clipping: it could hide a gradient that is off by a factor (the weights would still match)
        "--model.grpo.max_grad_norm",
        "null",
        "--trainer.callbacks+=tests.test_ddp_sync.AllReduceCounter",
        "--trainer.callbacks.init_args.out",
        os.path.join(str(out), "counter"),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_sync")
    no_step_norms = ("--model.grpo.log_step_grad_norms", "false")
    return {
        "once_per_step": fit_two_ranks(root / "new", *no_step_norms),
        "every_backward": fit_two_ranks(
            root / "old", *no_step_norms, "--trainer.callbacks.init_args.sync_every_backward", "true"
        ),
        "step_norms": fit_two_ranks(root / "norms", "--model.grpo.log_step_grad_norms", "true"),
        "default": fit_two_ranks(root / "default"),
    }


@pytest.mark.slow
def test_one_gradient_all_reduce_per_optimizer_step(runs):
    adapter = runs["once_per_step"][0]["adapters"][-1]
    # One bucket per sync: the whole LoRA adapter (16 tensors, 2048 floats) fits in DDP's first bucket.
    assert sum(p.numel() * p.element_size() for p in adapter.values()) < FIRST_BUCKET_BYTES
    for rank in (0, 1):
        # before: every backward all-reduces, 3 trained steps x 4 minibatches = 12 per iteration
        before = runs["every_backward"][rank]["all_reduces"]
        assert before == [TRAINED_STEPS * MINIBATCHES] * ITERATIONS == [12, 12]
        # now: only the last backward before each of the 2 optimizer steps
        assert runs["once_per_step"][rank]["all_reduces"] == [OPTIMIZER_STEPS] * ITERATIONS == [2, 2]
        # grad/norm_t{k} needs each backward's rank-averaged gradient, so logging it syncs every backward
        assert runs["step_norms"][rank]["all_reduces"] == [12, 12]
        # the default (log_step_grad_norms null) leaves them out under DDP: one sync per optimizer step
        assert runs["default"][rank]["all_reduces"] == [2, 2]


def _relative_differences(a: dict, b: dict) -> dict[str, float]:
    return {name: float((a[name] - b[name]).norm() / b[name].norm()) for name in b}


@pytest.mark.slow
def test_skipping_the_sync_trains_the_same_weights(runs):
    new, old = runs["once_per_step"], runs["every_backward"]
    # DDP keeps the ranks' replicas identical either way (bit for bit: they apply the same reduced gradient)
    for run in (new, old):
        for name, p in run[0]["adapters"][-1].items():
            assert torch.equal(p, run[1]["adapters"][-1][name])
    # Compared: lora_B, which starts at zero and carries the training. lora_A came out bit-identical in the
    # two runs (its steps, lr 0.5 x a gradient scaled by B's ~1e-4 entries, are at or below float32's
    # resolution of its ~0.5 entries), so it would only dilute the relative difference.
    trained = [name for name in new[0]["adapters"][0] if "lora_B" in name]
    assert len(trained) == 8
    first_new, first_old = ({k: run[0]["adapters"][0][k] for k in trained} for run in (new, old))
    assert all(p.norm() > 0 for p in first_old.values())
    # The synced gradient is mean_r(sum_k g_rk) instead of sum_k mean_r(g_rk): the same sum in another float
    # order. After iteration 1 (2 SGD steps from the same rollout) each lora_B agrees to float32 rounding:
    # relative L2 difference < 1e-6 (measured <= 1.1e-7). A missing or doubled mean over the 2 ranks, or a
    # backward's gradient lost, would move them by tens of percent.
    assert max(_relative_differences(first_new, first_old).values()) < 1e-6
    # After iteration 2 the rollout already ran on the two runs' slightly different weights, and the
    # difference grows through the sampled images, rewards and group-standardised advantages (measured
    # <= 5.1e-5): still float noise, three orders below a real change.
    last_new, last_old = ({k: run[0]["adapters"][-1][k] for k in trained} for run in (new, old))
    assert max(_relative_differences(last_new, last_old).values()) < 1e-3
    # with grad/norm_t{k} on, the update syncs every backward: bit-identical to the previous behaviour
    for name, p in runs["step_norms"][0]["adapters"][-1].items():
        assert torch.equal(p, old[0]["adapters"][-1][name])


def test_gradient_sync_is_a_no_op_on_a_single_device():
    class Module:
        class trainer:
            strategy = SingleDeviceStrategy(device=torch.device("cpu"))

    for sync in (False, True):
        context = guardrl.update.gradient_sync(Module(), sync)
        with context:
            pass
        assert type(context).__name__ == "nullcontext"
