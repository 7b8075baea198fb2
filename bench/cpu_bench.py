"""CPU benchmark on the tiny SD3 model (issue 4): prints a table, asserts nothing.

1. Rollout throughput: guardrl's rollout (SDE on the trained steps, log-probs stored) against a stock
   diffusers StableDiffusion3Pipeline call with the same transformer, steps, batch and prompt embeddings
   (both return latents; the VAE decode is timed separately and equal for both).
2. GRPO iteration overhead: the wall time of one `GRPOModule.training_step` inside a real Trainer against the
   pure model compute it must do: the rollout's transformer forwards, the decode, the reward, and per update
   the trained steps' forward + backward (+ the reference forward for train/kl) and the optimizer steps.
   After each real iteration one pure pass runs and is timed, so the two alternate.
3. Overlapped rewards: iteration time with 4 rollout chunks, the reward (with a fixed latency per call, as a
   served reward has) scored after each chunk or in a worker thread during the next chunk's rollout.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/cpu_bench.py \
        [--repeats 9] [--iterations 8] [--reward-latency 0.15]

Medians; the two sides of each comparison are timed alternately in one process (a shared machine's load
then hits both alike), and the first call of each is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

PROMPTS_PER_BATCH, GROUP_SIZE, STEPS = 4, 4, 10


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rollout_vs_pipeline(repeats: int) -> dict[str, float]:
    from guardrl.policy import FlowPolicy, LoraSpec, TinySD3Backbone
    from guardrl.sampling import noise_scales, sample_rollouts

    backbone = TinySD3Backbone(seed=0)
    policy = FlowPolicy(backbone, LoraSpec(rank=4, alpha=8))
    policy.build()
    batch = PROMPTS_PER_BATCH * GROUP_SIZE
    prompts = [f"prompt {i // GROUP_SIZE}" for i in range(batch)]
    cond = backbone.encode_prompts(prompts, with_negative=False)
    sigmas = backbone.sigmas(STEPS)
    scales = noise_scales(sigmas, 0.7, "flow_grpo", range(0, STEPS - 1))
    pipe = backbone.pipeline

    def guardrl_rollout():
        generator = torch.Generator().manual_seed(0)
        noise = backbone.initial_noise(batch, generator, torch.device("cpu"))
        # what GRPOModule._rollout does: the old snapshot equals the policy here, so no adapter switch
        weights = "policy" if policy.old_equals_policy() else "old"
        with torch.no_grad(), policy.use_weights(weights) as transformer:
            return sample_rollouts(
                lambda x, t, k: backbone.velocity(x, t, cond, 1.0, transformer),
                noise,
                sigmas,
                scales,
                "mean",
                generator,
            ).final_latents

    def stock_pipeline():
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe(
                prompt_embeds=cond.prompt_embeds,
                pooled_prompt_embeds=cond.pooled_prompt_embeds,
                num_inference_steps=STEPS,
                guidance_scale=1.0,
                generator=generator,
                output_type="latent",
            ).images

    pipe.set_progress_bar_config(disable=True)
    latents = guardrl_rollout()
    stock_pipeline()  # warm-up (guardrl's rollout warmed up above)
    ours_times, stock_times = [], []
    for r in range(repeats):  # alternately, so that load on the machine hits both alike, in ABBA order, so
        # that any bias of running first or second in a pair cancels
        pair = ((guardrl_rollout, ours_times), (stock_pipeline, stock_times))
        for fn, times in pair if r % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ours, stock = statistics.median(ours_times), statistics.median(stock_times)
    decode = _median_time(lambda: backbone.decode(latents), repeats)
    return {"batch": batch, "guardrl_s": ours, "stock_s": stock, "decode_s": decode}


def _pure_compute(module) -> dict:
    """Callables doing an iteration's model compute as bare tensor programs on `module` (no Lightning, no
    logging, no statistics): the rollout's forwards, the decode, the reward, and the updates."""
    from guardrl.sampling import sample_rollouts, step_mean_and_std

    backbone, policy, grpo = module.backbone, module.policy, module.grpo
    batch = PROMPTS_PER_BATCH * GROUP_SIZE
    prompts = [f"prompt {i // GROUP_SIZE}" for i in range(batch)]
    cond = backbone.encode_prompts(prompts, with_negative=False)
    optimizer = module.optimizers().optimizer
    state = {}

    def rollout():
        generator = torch.Generator().manual_seed(0)
        noise = backbone.initial_noise(batch, generator, torch.device("cpu"))
        with torch.no_grad(), policy.use_weights("old") as transformer:
            state["traj"] = sample_rollouts(
                lambda x, t, k: backbone.velocity(x, t, cond, 1.0, transformer),
                noise,
                module.sigmas,
                module.noise_scales,
                "mean",
                generator,
            )

    def decode():
        state["images"] = backbone.decode(state["traj"].final_latents)

    def reward():
        module.rewards[0](state["images"], prompts)

    def update():
        traj, minibatch = state["traj"], grpo.minibatch_size
        for _ in range(grpo.num_inner_epochs):
            for start in range(0, batch, minibatch):
                index = torch.arange(start, start + minibatch)
                step_cond = cond.select(index)
                for j in range(traj.num_stored_steps):
                    latents = traj.latents_BTCHW[index, j]
                    t, t_next = traj.sigma_T[j], traj.sigma_next_T[j]
                    velocity = backbone.velocity(latents, t, step_cond, 1.0)
                    mean, _ = step_mean_and_std(velocity, latents, t, t_next, traj.noise_scale_T[j])
                    if grpo.needs_reference:
                        with torch.no_grad(), policy.use_weights("reference") as reference:
                            backbone.velocity(latents, t, step_cond, 1.0, reference)
                    mean.square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return {"rollout": rollout, "decode": decode, "reward": reward, "update": update}


def iteration_vs_compute(iterations: int) -> dict[str, float]:
    """Median wall time of a real GRPO iteration (inside Trainer.fit) and of its pure compute, the two timed
    alternately in one process (after each real iteration, one pure pass), so load on the machine hits
    both."""
    import lightning as L

    from conftest import tiny_fit_args
    from guardrl.cli import main

    tmp = tempfile.mkdtemp()
    prompt_file = os.path.join(tmp, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(f"prompt {i}" for i in range(64)) + "\n")
    args = tiny_fit_args(
        prompt_file,
        tmp,
        **{
            "--model.sampling.num_inference_steps": str(STEPS),
            "--data.group_size": str(GROUP_SIZE),
            "--data.prompts_per_batch": str(PROMPTS_PER_BATCH),
            "--model.grpo.minibatch_size": "8",
            "--model.max_iterations": str(iterations + 1),
            "--trainer.logger": "false",
            "--trainer.enable_checkpointing": "false",
            "--model.grpo.log_step_grad_norms": "false",
        },
    )
    cli = main(args, run=False)

    class Interleaved(L.Callback):
        def __init__(self):
            self.iteration: list[float] = []
            self.parts: dict[str, list[float]] = {}

        def on_train_batch_start(self, *a):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, *a):
            elapsed = time.perf_counter() - self.start
            parts = _pure_compute(module)
            timed = {}
            for name, fn in parts.items():
                begin = time.perf_counter()
                fn()
                timed[name] = time.perf_counter() - begin
            if module.num_iterations > 1:  # the first iteration and pass warm up
                self.iteration.append(elapsed)
                for name, value in timed.items():
                    self.parts.setdefault(name, []).append(value)

    timer = Interleaved()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    result = {f"{name}_s": statistics.median(values) for name, values in timer.parts.items()}
    pure = [sum(values) for values in zip(*timer.parts.values())]
    result["pure_s"] = statistics.median(pure)
    result["iteration_s"] = statistics.median(timer.iteration)
    result["ratios"] = [i / p for i, p in zip(timer.iteration, pure)]
    return result


def overlap_vs_serial(iterations: int, latency_s: float, reps: int = 2) -> dict[str, float]:
    """Iteration wall time with rollout_chunks=4, the reward scored after each chunk (serial) or in a worker
    thread while the next chunk samples (overlapped). The reward waits `latency_s` per call before scoring
    (FaultInjectionReward's sleep: what a served reward's round trip costs this process), JPEG afterwards.
    Serial and overlapped fits alternate `reps` times; medians over their iterations after the first."""
    import json

    import lightning as L

    from conftest import tiny_fit_args
    from guardrl.cli import main

    tmp = tempfile.mkdtemp()
    prompt_file = os.path.join(tmp, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(f"prompt {i}" for i in range(64)) + "\n")
    reward = json.dumps(
        [
            {
                "class_path": "guardrl.rewards.FaultInjectionReward",
                "init_args": {"sleep_at_calls": list(range(4 * (iterations + 1))), "sleep_s": latency_s},
            }
        ]
    )

    class IterationTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *a):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *a):
            self.times.append(time.perf_counter() - self.start)

    times: dict[str, list[float]] = {"serial": [], "overlapped": []}
    for _ in range(reps):
        for name in ("serial", "overlapped"):
            args = tiny_fit_args(
                prompt_file,
                tmp,
                **{
                    "--model.sampling.num_inference_steps": str(STEPS),
                    "--data.group_size": str(GROUP_SIZE),
                    "--data.prompts_per_batch": str(PROMPTS_PER_BATCH),
                    "--model.grpo.minibatch_size": "8",
                    "--model.max_iterations": str(iterations + 1),
                    "--trainer.logger": "false",
                    "--trainer.enable_checkpointing": "false",
                    "--model.rewards": reward,
                    "--model.performance.rollout_chunks": "4",
                    "--model.performance.overlap_rewards": str(name == "overlapped").lower(),
                },
            )
            cli = main(args, run=False)
            timer = IterationTimer()
            cli.trainer.callbacks.append(timer)
            cli.trainer.fit(cli.model, cli.datamodule)
            times[name] += timer.times[1:]  # the first iteration warms up
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--iterations", type=int, default=8, help="timed GRPO iterations (each paired with a pure pass)"
    )
    parser.add_argument(
        "--reward-latency",
        type=float,
        default=0.15,
        help="seconds a call of the overlap benchmark's reward waits (a served reward's round trip)",
    )
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the in-process `guardrl fit` below must not see this script's options
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {PROMPTS_PER_BATCH} prompts x {GROUP_SIZE}, {STEPS} sampler steps, tiny SD3"
    )
    r = rollout_vs_pipeline(args.repeats)
    print("\n| rollout (latents, no decode) | seconds (median) | images/s |\n|---|---|---|")
    print(f"| guardrl rollout (SDE + log-probs) | {r['guardrl_s']:.3f} | {r['batch'] / r['guardrl_s']:.1f} |")
    print(f"| stock StableDiffusion3Pipeline | {r['stock_s']:.3f} | {r['batch'] / r['stock_s']:.1f} |")
    print(f"| ratio guardrl / stock throughput | | {r['stock_s'] / r['guardrl_s']:.3f} |")
    p = iteration_vs_compute(args.iterations)
    print("\n| GRPO iteration | seconds (median) |\n|---|---|")
    for name in ("rollout_s", "decode_s", "reward_s", "update_s", "pure_s", "iteration_s"):
        print(f"| {name[:-2]} | {p[name]:.3f} |")
    print(f"| iteration / pure compute (median of per-pair ratios) | {statistics.median(p['ratios']):.3f} |")
    latency = args.reward_latency
    o = overlap_vs_serial(max(2, args.iterations // 2), latency)
    print(
        f"\n| rollout_chunks 4, reward with {latency:.2f} s latency per call | iteration seconds (median) |"
        "\n|---|---|"
    )
    print(f"| reward after each chunk (serial) | {o['serial']:.3f} |")
    print(f"| reward overlapped with the next chunk | {o['overlapped']:.3f} |")
    print(
        "| saved per iteration (expected: the waits of all but the last chunk, "
        f"3 x {latency:.2f} = {3 * latency:.2f}) | {o['serial'] - o['overlapped']:.3f} |"
    )


if __name__ == "__main__":
    main()
