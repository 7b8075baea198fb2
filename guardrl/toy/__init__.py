"""The toy world: a GenEval-like benchmark that runs on a CPU (see docs/toy_world.md).

    world    palette, shapes, PromptSpec, object sizes per image size
    grammar  prompt text <-> PromptSpec, the enumerated vocabulary, the train / held-out split, prompt files
    render   PromptSpec + seed -> image (deterministic, no anti-aliasing)
    verify   the exact verifier: per-check verdicts, batched over generator outputs
    gold     gold metrics as torchmetrics Metrics (pass rate, off-palette fraction, realism distance) and
             Average(gold)
    model    the toy text-to-image model: a pixel-space diffusers SD3 transformer + a word-level text encoder
    backbone ToyBackbone, the pretrained toy model behind guardrl's FlowBackbone interface
    pretrain rectified-flow pretraining of the toy model (python -m guardrl.toy.pretrain)
    evaluate pass rates per kind and gold metrics of a toy model (python -m guardrl.toy.evaluate)
    proxy    ToyProxyReward (proxy_reward.py), the learned and hackable proxy reward: its network
             (proxy_net.py), data, training, evaluation and attack (proxy_*.py); the command
             python -m guardrl.toy.proxy train|evaluate|hack
    benchmark every ratio variant + a null control, proxy and gold over iterations
             (python -m guardrl.toy.benchmark)
    learning does it train? every variant + a null control on three rewards (python -m guardrl.toy.learning)
    rewards  ToyColorShare, a rule-based reward: the share of pixels in the prompt's colours

The names below are loaded on first use, not when the package is imported: `python -m guardrl.toy.verify`
(and `.gold`, `.grammar`) then runs its module once, and `import guardrl.toy` does not pull in torchmetrics.
The single-image `render.render` and `verify.verify` are not re-exported: their names are their modules'.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "COLORS": "world",
    "KINDS": "world",
    "PALETTE": "world",
    "RELATIONS": "world",
    "SHAPES": "world",
    "ObjectSpec": "world",
    "PromptSpec": "world",
    "geometry": "world",
    "enumerate_prompts": "grammar",
    "enumerate_specs": "grammar",
    "parse_prompt": "grammar",
    "prompt_text": "grammar",
    "sample_specs": "grammar",
    "split_of": "grammar",
    "split_prompts": "grammar",
    "write_prompt_file": "grammar",
    "write_split_files": "grammar",
    "render_batch": "render",
    "render_tensor": "render",
    "Verdict": "verify",
    "quantize": "verify",
    "verify_batch": "verify",
    "OffPaletteFraction": "gold",
    "RealismDistance": "gold",
    "VerifierPassRate": "gold",
    "average_gold": "gold",
    "gold_metrics": "gold",
    "ToyTextEncoder": "model",
    "build_toy_model": "model",
    "load_toy_model": "model",
    "save_toy_model": "model",
    "ToyBackbone": "backbone",
    "ToyProxyReward": "proxy_reward",
    "ToyColorShare": "rewards",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"guardrl.toy.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'guardrl.toy' has no attribute {name!r}")
