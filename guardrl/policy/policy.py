"""The flow-matching policy: a backbone plus the weights GRPO needs side by side.

Four sets of weights share one transformer:
    "policy"     the weights being trained (LoRA adapter "default", or the whole transformer)
    "old"        the snapshot that rolls out; synced from "policy" on a cadence (adapter "old", or a copy)
    "reference"  the base model for the KL penalty (adapters disabled, or a frozen copy of the start)
    "ema"        optional exponential moving average of "policy" (adapter "ema", or a copy)

With LoRA, every set is a peft adapter on the same frozen base, so a snapshot costs only the adapter's
size and all of them shard like the base under FSDP. `use_weights(name)` selects one for a forward.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from guardrl.dtensors import is_sharded
from guardrl.policy.backbones import FlowBackbone
from guardrl.policy.lora import LoraSpec

WEIGHT_SETS = ("policy", "old", "reference", "ema")
_ADAPTER_OF = {"policy": "default", "old": "old", "ema": "ema"}


class FlowPolicy(nn.Module):
    def __init__(
        self,
        backbone: FlowBackbone,
        lora: LoraSpec | None,
        ema_decay: float | None = None,
        keep_reference: bool = True,
    ) -> None:
        """
        Args:
            backbone: the (not yet loaded) backbone.
            lora: LoRA settings; None means full fine-tuning of the transformer.
            ema_decay: keep an EMA of the trained weights with this decay (None: no EMA).
            keep_reference: full fine-tuning only: keep a frozen copy of the starting transformer as the
                KL reference (LoRA gets the reference for free by disabling adapters).
        """
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.backbone = backbone
        self.lora = lora
        self.ema_decay = ema_decay
        self.keep_reference = keep_reference
        self._built = False

    # ----- construction
    def build(self) -> None:
        if self._built:
            return
        self.backbone.load()
        transformer = self.backbone.transformer
        if self.lora is not None:
            # lora.target_modules null: the backbone's own targets (known only once it is loaded)
            self.lora = self.lora.for_backbone(self.backbone)
            config = self.lora.to_peft_config()
            names = ["default", "old"] + (["ema"] if self.ema_decay is not None else [])
            with warnings.catch_warnings():
                # peft warns that a second adapter makes a multi-adapter model: that is the design here.
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                for name in names:
                    transformer.add_adapter(config, adapter_name=name)
            transformer.set_adapter("default")
            # Adapters in float32 whatever the base dtype: bf16/fp16 weights and AdamW moments lose small LoRA
            # updates, and the old/EMA snapshots must hold the trained values exactly. peft casts the layer
            # input to the adapter's dtype and the result back.
            for name, p in transformer.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(torch.float32)
        else:
            transformer.requires_grad_(True)
            # Full fine-tuning: snapshots are whole copies, kept out of the optimizer.
            self.old_transformer = self._frozen_copy(transformer)
            if self.ema_decay is not None:
                self.ema_transformer = self._frozen_copy(transformer)
            if self.keep_reference:
                self.reference_transformer = self._frozen_copy(transformer)
        self._restore_trainable_flags()
        # Nothing here should ever run in train mode: dropout would make the update's recomputed mean
        # differ from the rollout's (text encoders, attention dropout, LoRA dropout).
        self.eval()
        self._built = True
        self.sync_old()
        if self.ema_decay is not None:
            self._copy_into("ema")

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        clone = copy.deepcopy(module)
        clone.requires_grad_(False)
        return clone.eval()

    @property
    def transformer(self) -> nn.Module:
        return self.backbone.transformer

    def transformer_copies(self) -> dict[str, nn.Module]:
        """Full fine-tuning's whole copies of the transformer that exist ("old", "ema", "reference"); empty
        with LoRA, where the snapshots are adapters of the one transformer."""
        names = {"old": "old_transformer", "ema": "ema_transformer", "reference": "reference_transformer"}
        return {
            key: getattr(self, attr) for key, attr in names.items() if getattr(self, attr, None) is not None
        }

    def enable_gradient_checkpointing(self) -> None:
        """performance.gradient_checkpointing: only the trained transformer (the copies run without grad,
        where checkpointing does nothing)."""
        transformer = self.transformer
        if not getattr(transformer, "_supports_gradient_checkpointing", False):
            raise ValueError(
                f"performance.gradient_checkpointing=true: {type(transformer).__name__} does not support "
                "gradient checkpointing (diffusers' _supports_gradient_checkpointing is false); "
                "set it to false"
            )
        transformer.enable_gradient_checkpointing()

    def compile_transformers(self, backend: str, mode: Optional[str]) -> None:
        """torch.compile the transformer and every copy of it (nn.Module.compile, in place)."""
        for module in [self.transformer, *self.transformer_copies().values()]:
            module.compile(backend=backend, mode=mode)

    # ----- parameter bookkeeping
    def _adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        marker = f".{adapter}."
        return {
            name.replace(marker, ".<adapter>."): p
            for name, p in self.transformer.named_parameters()
            if "lora_" in name and marker in name
        }

    def named_weight_set(self, which: str) -> dict[str, torch.Tensor]:
        """The tensors of one weight set, keyed by a name shared across sets."""
        if which not in WEIGHT_SETS or which == "reference":
            raise ValueError(f"weight set must be one of policy/old/ema, got {which!r}")
        if self.lora is not None:
            return self._adapter_params(_ADAPTER_OF[which])
        module = self.transformer if which == "policy" else self.transformer_copies().get(which)
        if module is None:
            raise ValueError(f"weight set {which!r} does not exist in this policy")
        return dict(module.named_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_weight_set("policy").values())

    def _restore_trainable_flags(self) -> None:
        # peft's set_adapter/disable_adapters toggle requires_grad; put back exactly what we train.
        if self.lora is None:
            return
        for name, p in self.transformer.named_parameters():
            p.requires_grad_("lora_" in name and ".default." in name)

    def is_trainable_state_key(self, key: str) -> bool:
        """Whether a state_dict key (relative to this module) holds state a checkpoint must keep."""
        if self.lora is not None:
            return "lora_" in key
        # The reference copy of full fine-tuning is the frozen base model: re-loaded, never checkpointed.
        return key.startswith(("backbone.transformer.", "old_transformer.", "ema_transformer."))

    # ----- snapshots
    @torch.no_grad()
    def _copy_into(self, target: str) -> None:
        source = self.named_weight_set("policy")
        for name, p in self.named_weight_set(target).items():
            p.copy_(source[name])

    def sync_old(self) -> None:
        """old <- policy."""
        self._copy_into("old")

    @torch.no_grad()
    def old_equals_policy(self) -> bool:
        """Whether the old-policy adapter holds exactly the policy's weights (true at every rollout when the
        snapshot is synced each iteration, FlowGRPO's setting), so a rollout may run the policy adapter as it
        is instead of switching adapters and back (peft walks every module for each switch). LoRA only, and
        not under FSDP2 (shards would need a collective to agree); False otherwise."""
        if self.lora is None:
            return False
        policy, old = self.named_weight_set("policy"), self.named_weight_set("old")
        if any(is_sharded(p) for p in policy.values()):
            return False
        return policy.keys() == old.keys() and all(torch.equal(old[name], p) for name, p in policy.items())

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * policy."""
        if self.ema_decay is None:
            return
        source = self.named_weight_set("policy")
        for name, p in self.named_weight_set("ema").items():
            p.lerp_(source[name].detach(), 1.0 - self.ema_decay)

    @contextmanager
    def use_weights(self, which: str) -> Iterator[nn.Module]:
        """Yield the transformer to run for one weight set (see the module docstring)."""
        if which not in WEIGHT_SETS:
            raise ValueError(f"weight set must be one of {WEIGHT_SETS}, got {which!r}")
        if which == "ema" and self.ema_decay is None:
            raise ValueError("no EMA is kept: set ema_decay to use the 'ema' weights")
        if self.lora is None:
            if which == "reference" and not self.keep_reference:
                raise ValueError("full fine-tuning without keep_reference has no reference weights")
            yield self.transformer if which == "policy" else self.transformer_copies()[which]
            return
        transformer = self.transformer
        if which == "policy":  # the active adapter already; no switch, no flag churn
            yield transformer
            return
        if which == "reference":
            transformer.disable_adapters()
        else:
            transformer.set_adapter(_ADAPTER_OF[which])
        try:
            yield transformer
        finally:
            if which == "reference":
                transformer.enable_adapters()
            transformer.set_adapter("default")
            self._restore_trainable_flags()
