"""The flow-matching policy: backbones (SD3, Flux, tiny, random weights of the full shapes), LoRA, old-policy
snapshot, reference, EMA."""

from guardrl.policy.backbones import Conditioning, FlowBackbone, FluxBackbone, SD3Backbone
from guardrl.policy.lora import LoraSpec
from guardrl.policy.policy import WEIGHT_SETS, FlowPolicy
from guardrl.policy.random_weights import (
    RandomFluxDevBackbone,
    RandomSD35LargeBackbone,
    RandomSD35MediumBackbone,
)
from guardrl.policy.tiny import TinyFluxBackbone, TinySD3Backbone

__all__ = [
    "WEIGHT_SETS",
    "Conditioning",
    "FlowBackbone",
    "FlowPolicy",
    "FluxBackbone",
    "LoraSpec",
    "RandomFluxDevBackbone",
    "RandomSD35LargeBackbone",
    "RandomSD35MediumBackbone",
    "SD3Backbone",
    "TinyFluxBackbone",
    "TinySD3Backbone",
]
