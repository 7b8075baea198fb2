#!/bin/bash
# FSDP2 against DDP on 2 CPU processes: the relative difference of the trained LoRA B matrices (docs/scale.md).
#   bash scripts/fsdp_vs_ddp.sh ITERATIONS RATIO_VARIANT OPTIMIZER LR [more guardrl fit flags]
#   e.g. 3 grpo_guard torch.optim.SGD 0.1
# About a minute per run on 2 cores.
set -euo pipefail
iterations=${1:-3}; variant=${2:-grpo_guard}; optimizer=${3:-torch.optim.SGD}; lr=${4:-0.1}; shift $(( $# < 4 ? $# : 4 ))
out=$(mktemp -d)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
common=(--config configs/tiny/grpo_guard.yaml --trainer.devices 2 --trainer.accelerator cpu
        --model.max_iterations "$iterations" --data.prompts_per_batch 2
        --trainer.callbacks+=guardrl.callbacks.LoraExport --model.optimizer "$optimizer" --model.optimizer.lr "$lr"
        --model.grpo.ratio_variant "$variant" --model.grpo.num_inner_epochs 1 --model.grpo.max_grad_norm null "$@")
python -m guardrl.cli fit "${common[@]}" --trainer.strategy ddp --trainer.logger.init_args.save_dir "$out/ddp" > "$out/ddp.log" 2>&1
python -m guardrl.cli fit "${common[@]}" --config configs/strategy/fsdp.yaml \
    --trainer.logger.init_args.save_dir "$out/fsdp" > "$out/fsdp.log" 2>&1
python - "$out" <<'PY'
import sys
from safetensors.torch import load_file
out = sys.argv[1]
name = "tiny_grpo_guard/version_0/lora/final/pytorch_lora_weights.safetensors"
a, b = load_file(f"{out}/ddp/{name}"), load_file(f"{out}/fsdp/{name}")
keys = [k for k in a if "lora_B" in k]
num = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys) ** 0.5
den = sum((a[k].double() ** 2).sum() for k in keys) ** 0.5
print(f"LoRA B: relative difference FSDP2 vs DDP {float(num / den):.3g} (norm {float(den):.3g})")
from guardrl.analysis import load_scalars
for run in ("ddp", "fsdp"):
    frame = load_scalars(f"{out}/{run}/tiny_grpo_guard/version_0", ["reward/mean", "train/loss", "grad/norm", "advantages/abs_mean"])
    rows = frame.pivot_table(index="step", columns="tag", values="value")
    print(run, "reward/mean by iteration:", [f"{v:.9g}" for v in rows["reward/mean"]],
          "grad/norm:", [f"{v:.9g}" for v in rows["grad/norm"]], "abs adv:", [f"{v:.9g}" for v in rows["advantages/abs_mean"]])
PY
