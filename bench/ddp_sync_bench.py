"""DDP gradient sync per optimizer step against per backward (issue 20, item 4): prints a table, asserts
nothing.

Two CPU processes (gloo) run `guardrl fit` on the tiny SD3 model, switching between guardrl's update as it is
(one gradient all-reduce per optimizer step, in its last backward) and the internal switch that restores one
all-reduce per backward (`guardrl.update._SYNC_EVERY_BACKWARD`) from one iteration to the next. The run is
the issue's example: 10 sampler steps, so 9 trained SDE steps, and 4 minibatches of 2 samples per rank
(2 prompts x 4 samples, one inner epoch), one optimizer step per minibatch: 36 backwards and 4 optimizer
steps per iteration. `grpo.log_step_grad_norms` is off, since grad/norm_t{k} needs the sync in every backward.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/ddp_sync_bench.py [--runs 2] [--iterations 16]

`SyncBenchProbe` (a callback the fit loads from this file) sets the switch before each iteration (the same on
both ranks), counts the all-reduces with a DDP comm hook, so the table shows what each kind did, and times
rank zero's iterations (`training_step`) and update phases (`update_policy`). Consecutive iterations form a
pair, one of each kind, the order alternating (ABBA), so a shared machine's load hits both kinds alike; the
first pair of each fit (warm-up) is not counted. Medians, and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from lightning.pytorch.callbacks import Callback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE, NOW = "every backward (before)", "once per optimizer step (now)"


class SyncBenchProbe(Callback):
    """In each process of the fit: switches the sync per iteration, counts gradient all-reduces, times
    iterations and update phases; rank zero writes them to `out`/times.json at the end."""

    def __init__(self, out: str) -> None:
        import guardrl.module

        self.out = out
        self.calls = 0
        self.records: list[dict] = []
        self._start = 0.0
        self._calls_at_start = 0
        self._update_s = 0.0
        self._every_backward = False
        # module.py calls the update phase by this name; wrapping it times the phase alone
        update_policy = guardrl.module.update_policy

        def timed_update(*args, **kwargs):
            start = time.perf_counter()
            try:
                return update_policy(*args, **kwargs)
            finally:
                self._update_s = time.perf_counter() - start

        guardrl.module.update_policy = timed_update

    def _hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls += 1
        return allreduce_hook(state, bucket)  # DDP's own mean over ranks

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, self._hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import guardrl.update

        # pairs (0, 1), (2, 3), ...: before first in even pairs, now first in odd ones (ABBA)
        pair, second = divmod(pl_module.num_iterations, 2)
        self._every_backward = (pair + second) % 2 == 0
        guardrl.update._SYNC_EVERY_BACKWARD = self._every_backward
        self._calls_at_start = self.calls
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        self.records.append(
            {
                "iteration_s": seconds,
                "update_s": self._update_s,
                "all_reduces": self.calls - self._calls_at_start,
                "kind": BEFORE if self._every_backward else NOW,
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        import torch
        import torch.distributed as dist

        # What one saved all-reduce costs by itself: the adapter's gradient size, on both ranks, after a
        # barrier; the mean of 200 (every rank calls this hook, so the collectives match).
        numel = sum(p.numel() for p in pl_module.policy.trainable_parameters())
        buffer = torch.zeros(numel)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(buffer)
        all_reduce_s = (time.perf_counter() - start) / 200
        if trainer.is_global_zero:
            with open(os.path.join(self.out, "times.json"), "w") as f:
                json.dump({"iterations": self.records, "all_reduce_s": all_reduce_s, "numel": numel}, f)


def fit(out: str, iterations: int) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MASTER_", "LOCAL_RANK", "WORLD_"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    settings = {
        "--config": "configs/tiny/grpo_guard.yaml",
        "--trainer.devices": "2",
        "--trainer.strategy": "ddp",
        "--trainer.accelerator": "cpu",
        "--trainer.enable_checkpointing": "false",
        "--trainer.enable_progress_bar": "false",
        "--trainer.logger.init_args.save_dir": out,
        "--model.max_iterations": str(iterations),
        "--data.prompts_per_batch": "2",
        "--model.sampling.num_inference_steps": "10",
        "--model.grpo.num_inner_epochs": "1",
        "--model.grpo.minibatch_size": "2",
        "--model.grpo.gradient_accumulation_steps": "1",
        "--model.grpo.log_step_grad_norms": "false",
        "--trainer.callbacks+": "bench.ddp_sync_bench.SyncBenchProbe",
        "--trainer.callbacks.init_args.out": out,
    }
    command = [sys.executable, "-m", "guardrl.cli", "fit"]
    for key, value in settings.items():
        command += [f"{key}={value}"] if key.endswith("+") else [key, value]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    with open(os.path.join(out, "times.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="fits, each switching kinds every iteration")
    parser.add_argument(
        "--iterations",
        type=int,
        default=16,
        help="GRPO iterations per fit (even; the first pair is a warm-up)",
    )
    args = parser.parse_args()
    rows: list[dict] = []
    pairs: list[dict[str, dict]] = []
    all_reduce_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            out = os.path.join(tmp, str(run))
            os.makedirs(out)
            result = fit(out, args.iterations)
            records = result["iterations"][2:]
            all_reduce_s.append(result["all_reduce_s"])
            rows += records
            pairs += [{r["kind"]: r for r in records[i : i + 2]} for i in range(0, len(records) - 1, 2)]
            print(f"fit {run + 1}/{args.runs} done", flush=True)
    print(
        f"\n2 ranks (DDP, gloo, CPU), tiny SD3; {args.runs} fits of {args.iterations} iterations switching "
        f"kinds every iteration, {len(pairs)} pairs after the warm-ups, rank zero's times"
    )
    print("| gradient all-reduce | all-reduces per iteration | update s (median) | iteration s (median) |")
    print("|---|---|---|---|")
    for kind in (BEFORE, NOW):
        mine = [r for r in rows if r["kind"] == kind]
        counts = ", ".join(map(str, sorted({r["all_reduces"] for r in mine})))
        update = statistics.median(r["update_s"] for r in mine)
        iteration = statistics.median(r["iteration_s"] for r in mine)
        print(f"| {kind} | {counts} | {update:.3f} | {iteration:.3f} |")
    for key in ("update_s", "iteration_s"):
        ratios = sorted(p[NOW][key] / p[BEFORE][key] for p in pairs)
        quartiles = statistics.quantiles(ratios, n=4)
        print(
            f"{key[:-2]} now / before, per pair: median {statistics.median(ratios):.3f}, "
            f"quartiles {quartiles[0]:.3f} - {quartiles[2]:.3f}, range {ratios[0]:.3f} - {ratios[-1]:.3f}"
        )
    one = statistics.median(all_reduce_s)
    before = statistics.median(r["update_s"] for r in rows if r["kind"] == BEFORE)
    saved = 32 * one  # 36 - 4 all-reduces per iteration
    print(
        f"one all-reduce of the adapter's gradient ({result['numel']} floats), alone: {one * 1e3:.3f} ms; "
        f"32 fewer per iteration: {saved * 1e3:.1f} ms, {100 * saved / before:.2f}% of the update"
    )


if __name__ == "__main__":
    main()
