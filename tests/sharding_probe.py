"""What the FSDP2 tests pass to `guardrl fit` subprocesses: `ShardingProbe`
(`--trainer.callbacks+=tests.sharding_probe.ShardingProbe`) records what each rank holds of the transformer
and the trained policy's velocity on a fixed input; `SmoothReward` is a reward that is a smooth function of
the pixels.

Why a smooth reward: JPEG compressibility (the tiny configs' reward) is a step function of the pixels, so a
float-level difference between two runs' weights can flip an image's JPEG size by a byte and move its group's
advantages by a few percent. Measured: DDP and FSDP2 at SGD lr 3 gave the same rewards in iteration 0 and
byte-level differences in 3 of 16 samples in iteration 1. Comparing two strategies needs a reward that keeps a
1e-9 difference a 1e-9 difference."""

import json
import os

import torch
from lightning.pytorch.callbacks import Callback

from guardrl.rewards import Reward
from guardrl.dtensors import full_tensor

PROBE_PROMPTS = ["a red circle", "a cat"]
PROBE_T = 0.6


def probe_inputs(backbone, device):
    latents = backbone.initial_noise(len(PROBE_PROMPTS), torch.Generator().manual_seed(123), device)
    return latents, backbone.encode_prompts(PROBE_PROMPTS, with_negative=False)


class ShardingProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        params = dict(pl_module.policy.transformer.named_parameters())
        sharded = {n: p for n, p in params.items() if hasattr(p, "full_tensor")}
        record = {
            "rank": trainer.global_rank,
            "parameters": len(params),
            "sharded": len(sharded),
            "local_numel": sum(p.to_local().numel() for p in sharded.values()),
            "full_numel": sum(p.numel() for p in sharded.values()),
            "trainable_sharded": sum(1 for n, p in sharded.items() if p.requires_grad),
        }
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)

    def on_train_end(self, trainer, pl_module) -> None:
        # Every rank runs the forward (FSDP2 all-gathers each block: a collective); rank zero saves it.
        latents, cond = probe_inputs(pl_module.backbone, pl_module.device)
        with torch.no_grad():
            velocity = pl_module.backbone.velocity(latents, PROBE_T, cond, 1.0)
        policy = pl_module.policy
        trained, old = policy.named_weight_set("policy"), policy.named_weight_set("old")
        # the old-policy snapshot was synced after the last iteration: equal to the trained adapter
        old_minus_policy = max(
            float((full_tensor(old[name]) - full_tensor(p)).abs().max()) for name, p in trained.items()
        )
        if trainer.is_global_zero:
            compiled = getattr(pl_module.policy.transformer, "_compiled_call_impl", None) is not None
            torch.save(
                {"velocity": velocity.cpu(), "old_minus_policy": old_minus_policy, "compiled": compiled},
                os.path.join(self.out, "velocity.pt"),
            )


class SmoothReward(Reward):
    """Redness: the red channel's mean minus the blue channel's, per image."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
