"""The flow-matching policy: backbones (SD3, Flux, tiny, random weights of the full shapes), LoRA, old-policy
snapshot, reference, EMA."""

from guardrl.policy.backbones import Conditioning, FlowBackbone, FluxBackbone, SD3Backbone
from guardrl.policy.flux2 import Flux2KleinBackbone
from guardrl.policy.kontext import FluxKontextBackbone, TinyFluxKontextBackbone
from guardrl.policy.lora import LoraSpec
from guardrl.policy.policy import WEIGHT_SETS, FlowPolicy
from guardrl.policy.qwen_image import QwenImageBackbone
from guardrl.policy.random_weights import (
    RandomFluxDevBackbone,
    RandomSD35LargeBackbone,
    RandomSD35MediumBackbone,
)
from guardrl.policy.tiny import TinyFluxBackbone, TinySD3Backbone
from guardrl.policy.z_image import ZImageBackbone

__all__ = [
    "WEIGHT_SETS",
    "Conditioning",
    "FlowBackbone",
    "FlowPolicy",
    "Flux2KleinBackbone",
    "FluxBackbone",
    "FluxKontextBackbone",
    "LoraSpec",
    "QwenImageBackbone",
    "RandomFluxDevBackbone",
    "RandomSD35LargeBackbone",
    "RandomSD35MediumBackbone",
    "SD3Backbone",
    "TinyFluxBackbone",
    "TinyFluxKontextBackbone",
    "TinySD3Backbone",
    "ZImageBackbone",
]
