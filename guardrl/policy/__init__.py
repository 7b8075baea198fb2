"""The flow-matching policy: backbones (SD3, Flux, tiny, random weights of the full shapes), LoRA, old-policy
snapshot, reference, EMA."""

from guardrl.policy.backbones import Conditioning, FlowBackbone, FluxBackbone, SD3Backbone
from guardrl.policy.flux2 import Flux2KleinBackbone, RandomFlux2Klein4BBackbone, RandomFlux2Klein9BBackbone
from guardrl.policy.kontext import FluxKontextBackbone, RandomFluxKontextBackbone, TinyFluxKontextBackbone
from guardrl.policy.lora import LoraSpec
from guardrl.policy.policy import WEIGHT_SETS, FlowPolicy
from guardrl.policy.qwen_image import QwenImageBackbone, RandomQwenImageBackbone
from guardrl.policy.qwen_image21 import QwenImage21Backbone, TinyQwenImage21Backbone
from guardrl.policy.qwen_image_edit import (
    QwenImageEditBackbone,
    RandomQwenImageEditBackbone,
    TinyQwenImageEditBackbone,
)
from guardrl.policy.random_weights import (
    RandomFluxDevBackbone,
    RandomSD35LargeBackbone,
    RandomSD35MediumBackbone,
)
from guardrl.policy.tiny import TinyFluxBackbone, TinySD3Backbone
from guardrl.policy.z_image import RandomZImageTurboBackbone, ZImageBackbone

__all__ = [
    "WEIGHT_SETS",
    "Conditioning",
    "FlowBackbone",
    "FlowPolicy",
    "Flux2KleinBackbone",
    "FluxBackbone",
    "FluxKontextBackbone",
    "LoraSpec",
    "QwenImage21Backbone",
    "QwenImageBackbone",
    "QwenImageEditBackbone",
    "RandomFlux2Klein4BBackbone",
    "RandomFlux2Klein9BBackbone",
    "RandomFluxDevBackbone",
    "RandomFluxKontextBackbone",
    "RandomQwenImageBackbone",
    "RandomQwenImageEditBackbone",
    "RandomSD35LargeBackbone",
    "RandomSD35MediumBackbone",
    "RandomZImageTurboBackbone",
    "SD3Backbone",
    "TinyFluxBackbone",
    "TinyFluxKontextBackbone",
    "TinyQwenImage21Backbone",
    "TinyQwenImageEditBackbone",
    "TinySD3Backbone",
    "ZImageBackbone",
]
