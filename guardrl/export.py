"""LoRA export in diffusers format: what a trained policy ships as.

`export_lora(policy, out_dir)` writes `pytorch_lora_weights.safetensors` (keys prefixed `transformer.`) with
the adapter metadata (rank, alpha, targets), through the stock pipeline class's `save_lora_weights`, so that
`StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(out_dir)` (or FluxPipeline) reproduces the
policy. Without the metadata diffusers would reload with alpha = rank and silently change the outputs.

From a checkpoint, with the run's own config (the base weights are not in the checkpoint):

    python -m guardrl.export --config runs/x/version_0/config.yaml \
        --ckpt runs/x/version_0/checkpoints/last.ckpt --out lora/ [--weights ema]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch
import yaml
from peft.utils import get_peft_model_state_dict

from guardrl.checkpointing import default_file_mode
from guardrl.dtensors import full_tensor
from guardrl.policy import FlowPolicy
from guardrl.runs import build_model
from guardrl.sharding import is_checkpoint, load_sharded_trainable_state

EXPORTABLE_WEIGHTS = ("policy", "ema")
_ADAPTER = {"policy": "default", "ema": "ema"}


def lora_state_dict(policy: FlowPolicy, weights: str = "policy") -> dict[str, torch.Tensor]:
    """The `weights` adapter ("policy" or "ema") as whole CPU tensors, in peft's key layout.

    Under FSDP2 the adapters are sharded DTensors and gathering them is a collective: call this on every rank.
    """
    if weights not in EXPORTABLE_WEIGHTS:
        raise ValueError(f"export weights={weights!r}: must be one of {EXPORTABLE_WEIGHTS}")
    if policy.lora is None:
        raise ValueError(
            "export: this run is full fine-tuning (model.lora: null), there is no LoRA to export; save the "
            "transformer with save_pretrained instead"
        )
    if weights == "ema" and policy.ema_decay is None:
        raise ValueError("export weights='ema': the run kept no EMA (model.grpo.ema_decay is null)")
    state = get_peft_model_state_dict(policy.transformer, adapter_name=_ADAPTER[weights])
    return {name: full_tensor(tensor).detach().to("cpu").contiguous() for name, tensor in state.items()}


def write_lora(policy: FlowPolicy, state: dict[str, torch.Tensor], out_dir: str) -> str:
    """Write a LoRA state (from `lora_state_dict`) in diffusers format with its adapter metadata."""
    metadata = policy.lora.to_peft_config().to_dict()
    os.makedirs(out_dir, exist_ok=True)
    backbone = policy.backbone
    pipeline_class = backbone.lora_format_class or backbone.pipeline_class or type(backbone.pipeline)
    pipeline_class.save_lora_weights(
        out_dir,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    path = os.path.join(out_dir, "pytorch_lora_weights.safetensors")
    os.chmod(
        path, default_file_mode()
    )  # safetensors writes 0600; the export is shared like the run's other files
    return path


def export_lora(policy: FlowPolicy, out_dir: str, weights: str = "policy") -> str:
    """Write the `weights` adapter ("policy" or "ema") of a LoRA policy to `out_dir`; returns the file path.
    Single process; under FSDP2 every rank calls `lora_state_dict` and one writes (callbacks.LoraExport)."""
    return write_lora(policy, lora_state_dict(policy, weights), out_dir)


def export_from_checkpoint(config: str, ckpt_path: str, out_dir: str, weights: str = "policy") -> str:
    """Rebuild the run's model from its saved config.yaml, load the checkpoint's trainable state, export."""
    if not is_checkpoint(ckpt_path):
        raise ValueError(f"--ckpt={ckpt_path!r}: no such file (or sharded checkpoint directory with meta.pt)")
    if not os.path.isfile(config):
        raise ValueError(
            f"--config={config!r}: no such file (use the config.yaml in the run's version folder)"
        )
    with open(config) as f:
        settings = yaml.safe_load(f)
    if not isinstance(settings, dict):
        raise ValueError(
            f"--config={config!r}: not a run's config (use the config.yaml in the run's version folder)"
        )
    # Only the model is built (guardrl/runs.py): no trainer, logger, data or callbacks.
    model = build_model(settings)
    model.configure_model()
    if os.path.isdir(ckpt_path):
        state = load_sharded_trainable_state(model, ckpt_path)
    else:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    model.check_checkpoint_state(state)
    model.load_state_dict(state, strict=False)
    return export_lora(model.policy, out_dir, weights)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guardrl.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml (in its version folder)")
    parser.add_argument("--ckpt", required=True, help="a checkpoint of that run")
    parser.add_argument("--out", required=True, help="output directory for pytorch_lora_weights.safetensors")
    parser.add_argument("--weights", default="policy", choices=EXPORTABLE_WEIGHTS)
    args = parser.parse_args(argv)
    path = export_from_checkpoint(args.config, args.ckpt, args.out, args.weights)
    print(f"LoRA written to {path}")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
