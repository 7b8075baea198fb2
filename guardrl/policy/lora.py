"""LoRA settings, converted to a peft `LoraConfig` in exactly one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig


@dataclass
class LoraSpec:
    """LoRA adapter on the transformer (the base weights stay frozen)."""

    rank: int = 32
    """Adapter rank r (FlowGRPO SD3.5 recipes: 32; Flux: 64)."""
    alpha: float = 64.0
    """lora_alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Leaf module names to adapt (diffusers attention projections by default)."""
    dropout: float = 0.0
    """Dropout on the adapter input. Keep 0 for RL: dropout makes the recomputed mean differ from the rollout's."""
    init: str = "gaussian"
    """peft `init_lora_weights`; "gaussian" keeps B = 0 so the adapted model starts equal to the base."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module, got an empty list")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def to_peft_config(self) -> LoraConfig:
        init = True if self.init == "default" else self.init
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=init,
        )
