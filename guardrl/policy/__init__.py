"""The flow-matching policy: backbones (SD3, Flux, tiny), LoRA, old-policy snapshot, reference, EMA."""

from guardrl.policy.backbones import Conditioning, FlowBackbone, FluxBackbone, SD3Backbone
from guardrl.policy.lora import LoraSpec
from guardrl.policy.policy import WEIGHT_SETS, FlowPolicy
from guardrl.policy.tiny import TinyFluxBackbone, TinySD3Backbone

__all__ = [
    "WEIGHT_SETS",
    "Conditioning",
    "FlowBackbone",
    "FlowPolicy",
    "FluxBackbone",
    "LoraSpec",
    "SD3Backbone",
    "TinyFluxBackbone",
    "TinySD3Backbone",
]
