"""Speed and memory switches of a run, and the per-phase timing every iteration logs.

A GRPO iteration has five phases: encode (text encoders, cached), rollout (the sampler's transformer forwards,
no grad), decode (VAE), reward and update (recomputed forwards, backwards, optimizer steps). `PhaseMeter`
times each one and counts its model FLOPs, so that every run reports its own model FLOP utilisation (MFU):

- FLOPs are counted exactly during the first iteration of the process, with torch's own per-operator
  formulas (`torch.utils.flop_counter.flop_registry`: matmuls, convolutions and attention, forward and
  backward, the usual definition of "model FLOPs"). Every later iteration has the same shapes, so the count
  is reused. `FlopCounter` applies the formulas in a bare dispatch mode: torch's `FlopCounterMode` gives the
  same total but also tracks the module hierarchy, which doubled a tiny model's first iteration (0.68 s
  against 0.37 s for a toy forward + backward; 0.44 s here). Counting slows the first iteration, which also
  pays for warm-up and compilation, so that iteration never enters a throughput.
- Throughput and MFU come from Lightning's `lightning.fabric.utilities.throughput.Throughput`, one per phase,
  over a window of `performance.throughput_window` iterations. MFU needs the device's peak FLOP/s: Lightning's
  table for the GPU and the run's compute dtype, or `performance.peak_flops` (e.g. the matmul ceiling that
  `bench/` measures); without either (a CPU), FLOP/s are logged and MFU is not.
- On CUDA the meter synchronises before reading the clock, so a phase's time includes its kernels.

Values are rank zero's (device-level), logged under time/, flops/ and throughput/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from guardrl.options import _require_int, _require_number

PHASES = ("encode", "rollout", "decode", "reward", "update")
TRAJECTORY_DTYPES = ("float32", "bfloat16", "float16")
# Phases whose FLOPs are the policy model's own (the reward's model is someone else's).
MODEL_PHASES = ("rollout", "decode", "update")


@dataclass
class PerformanceOptions:
    """Memory savers, compilation and the per-phase timing (docs/performance.md)."""

    gradient_checkpointing: bool = False
    """Recompute the transformer's block activations in the backward pass instead of storing them (diffusers'
    `enable_gradient_checkpointing`): less memory in the update for about one more forward of compute."""
    compile: bool = False
    """Compile the transformer with `torch.compile` (after the first iteration, which counts FLOPs
    eagerly)."""
    compile_backend: str = "inductor"
    """torch.compile backend ("inductor"; "aot_eager" or "eager" to debug a compile problem)."""
    compile_mode: Optional[str] = None
    """torch.compile mode: None (default), "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"."""
    rollout_chunks: int = 1
    """Roll each rank's batch out in this many chunks of whole prompt groups (decoded one after another): caps
    the rollout's activation memory, and lets `overlap_rewards` score a chunk while the next one samples.
    Must divide data.prompts_per_batch. Chunk c draws its noise from its own stream (seed, iteration, rank,
    c), so a run's numbers depend on this setting (not on overlap_rewards)."""
    overlap_rewards: bool = False
    """Score each chunk's images in a background thread while the next chunk is rolled out (needs
    rollout_chunks >= 2); pays off when rewards wait on something other than this process's compute: a
    reward server on another GPU, CPU-side scoring (JPEG, OCR post-processing) during GPU sampling.
    time/reward_s is then the reward time left exposed after the last rollout."""
    trajectory_dtype: str = "float32"
    """dtype of the stored rollout latents x_t and x_next: "float32", or "bfloat16" / "float16" to halve them
    (the sampler then carries its chain at that precision, as diffusers pipelines carry latents in the model
    dtype, and the on-policy ratio stays exactly 1; step means and log-probs stay float32)."""
    timing: bool = True
    """Time every phase and count its FLOPs (logged as time/*, flops/*, throughput/*)."""
    throughput_window: int = 4
    """Iterations in the throughput / MFU window (the first iteration of a process is never in it)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU; None: Lightning's table for the GPU and compute dtype (none on
    CPU)."""

    def __post_init__(self) -> None:
        _require_int("performance.throughput_window", self.throughput_window, minimum=2)
        _require_int("performance.rollout_chunks", self.rollout_chunks, minimum=1)
        if self.trajectory_dtype not in TRAJECTORY_DTYPES:
            raise ValueError(
                f"performance.trajectory_dtype must be one of {', '.join(map(repr, TRAJECTORY_DTYPES))}; "
                f"got {self.trajectory_dtype!r}"
            )
        if self.overlap_rewards and self.rollout_chunks < 2:
            raise ValueError(
                f"performance.overlap_rewards=True needs performance.rollout_chunks >= 2, got rollout_chunks="
                f"{self.rollout_chunks}: with one chunk there is no next rollout to score alongside"
            )
        _require_number("performance.peak_flops", self.peak_flops, minimum=0.0, strict=True, allow_none=True)
        modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise ValueError(
                f"performance.compile_mode must be one of {', '.join(map(repr, modes))}; got "
                f"{self.compile_mode!r}"
            )
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(
                f"performance.compile_backend must be a backend name such as 'inductor', got "
                f"{self.compile_backend!r}"
            )
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=()) + ["eager", "aot_eager"]
            if self.compile_backend not in backends:
                raise ValueError(
                    f"performance.compile_backend={self.compile_backend!r} is not a torch.compile "
                    f"backend; available: {', '.join(sorted(set(backends)))}"
                )

    @property
    def trajectory_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.trajectory_dtype)


def compute_dtype(precision: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype of a mixed-precision run, else the weights' dtype."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return model_dtype


def peak_flops_of(device: torch.device, dtype: torch.dtype, override: Optional[float]) -> Optional[float]:
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None  # Lightning has no CPU table; performance.peak_flops sets one
    return get_available_flops(device, dtype)


class FlopCounter(TorchDispatchMode):
    """Sum of the model FLOPs of every operator run under it (torch's formulas, no module tracking)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class PhaseMeter:
    """Wall time and model FLOPs of each phase of an iteration, and their throughput over a window."""

    def __init__(
        self, device: torch.device, peak_flops: Optional[float], window: int, count_flops: bool = True
    ):
        self.device = device
        self.peak_flops = peak_flops
        self.counting = count_flops
        self.flops: dict[str, int] = {}
        self._times: dict[str, float] = {}
        self._total_time: dict[str, float] = {}
        self._measured = 0
        self._throughput = {
            name: Throughput(available_flops=peak_flops, window_size=window, separator="/")
            for name in (*PHASES, "iteration")
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")
        counter = FlopCounter() if self.counting else nullcontext()
        self._sync()
        start = time.perf_counter()
        with counter:
            yield
        self._sync()
        self._times[name] = self._times.get(name, 0.0) + time.perf_counter() - start
        if self.counting:
            self.flops[name] = self.flops.get(name, 0) + counter.total

    def end_iteration(self, samples: int) -> dict[str, float]:
        """Metrics of the iteration that just ended (`samples`: images it generated on this device)."""
        times, self._times = self._times, {}
        metrics = {f"time/{name}_s": seconds for name, seconds in times.items()}
        metrics["time/iteration_s"] = iteration_seconds = sum(times.values())
        if self.flops:
            metrics.update({f"flops/{name}": float(self.flops.get(name, 0)) for name in times})
            metrics["flops/model"] = float(sum(self.flops.get(name, 0) for name in MODEL_PHASES))
        if self.counting:
            # The counted iteration (also warm-up / compilation) stays out of every throughput.
            self.counting = False
            return metrics
        self._measured += 1
        times = {**times, "iteration": iteration_seconds}
        for name, seconds in times.items():
            self._total_time[name] = self._total_time.get(name, 0.0) + seconds
            if name == "iteration":
                flops = sum(self.flops.get(phase, 0) for phase in MODEL_PHASES)
            else:
                flops = self.flops.get(name, 0)
            throughput = self._throughput[name]
            throughput.update(
                time=self._total_time[name],
                batches=self._measured,
                samples=self._measured * samples,
                flops=flops,
            )
            for key, value in throughput.compute().items():
                if key.startswith("device/") and (
                    name in MODEL_PHASES or name == "iteration" or "samples" in key
                ):
                    metrics[f"throughput/{name}/{key[len('device/') :]}"] = value
        return metrics
