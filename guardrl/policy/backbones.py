"""Flow-matching backbones: everything that differs between models lives here, behind one interface.

The backbone contract (checked on every backbone class by tests/test_backbone_contract.py). A backbone owns a
diffusers pipeline's components (transformer, VAE, text encoders, scheduler) and offers what the GRPO loop
needs, which never branches on the model:
- conditioning: `encode_prompts` -> `Conditioning`, named batch-first tensors the backbone defines itself (no
  pooled-embedding assumption; variable-length text pads in `collate`); a prompt's rows never depend on the
  batch it came in; editing models (`takes_condition_image`) add a conditioning image's tensors per prompt;
- noise, velocity and images: `initial_noise` for `height` x `width` (non-square allowed), `velocity` in
  float32 with or without true CFG, `decode` with the VAE's scaling, shift or latent statistics taken from
  its config;
- the sigma schedule: `sigmas`, the stock pipeline's own (shift, dynamic shift), overridable;
- FSDP2: `shard_block_names`, the transformer's ModuleLists of blocks.
guardrl's ODE sampler with these reproduces the stock pipeline's images (the contract test checks it).

Loading is lazy (`load()`, called from `GRPOModule.configure_model`) so that LightningCLI can build and
validate a config without touching weights, and so that sharded strategies can wrap the modules after load.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import diffusers
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from torch import nn

from guardrl.sampling.schedules import flow_match_sigmas

_log = logging.getLogger(__name__)
TRUNCATION_MESSAGE = "The following part of your input was truncated"


@contextmanager
def _caught_truncations(pipeline):
    """Within the block, diffusers' truncation warnings of `pipeline` (each repeats the cut-off text) are kept
    out of the log; yields the list they are appended to."""
    logger = logging.getLogger(type(pipeline).__module__)
    seen: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(TRUNCATION_MESSAGE):
            seen.append(record)
            return False
        return True

    logger.addFilter(keep)
    try:
        yield seen
    finally:
        logger.removeFilter(keep)


_DIFFUSERS_VERSION = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How a config names a backbone argument (LightningCLI: model.backbone.class_path / init_args).
OPTION = "model.backbone.init_args"
# Which backbone loads which diffusers pipeline (model_index.json's "_class_name").
# tests/test_backbone_contract.py checks that every production backbone is listed.
BACKBONE_OF_PIPELINE = {
    "StableDiffusion3Pipeline": "guardrl.policy.SD3Backbone",
    "FluxPipeline": "guardrl.policy.FluxBackbone",
    "QwenImagePipeline": "guardrl.policy.QwenImageBackbone",
    "Flux2KleinPipeline": "guardrl.policy.Flux2KleinBackbone",
    "FluxKontextPipeline": "guardrl.policy.FluxKontextBackbone",
    "QwenImageEditPipeline": "guardrl.policy.QwenImageEditBackbone",
    "ZImagePipeline": "guardrl.policy.ZImageBackbone",
    "QwenImage21Pipeline": "guardrl.policy.QwenImage21Backbone",
}


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def parse_dtype(name: str, option: str = f"{OPTION}.torch_dtype") -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{option} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _looks_like_local_path(path: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-dotted, home-based or deeper is a path.
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path


@dataclass
class Conditioning:
    """The conditioning of B samples: named tensors, each batch-first (B, ...), named as the backbone's
    transformer takes them (SD3: prompt_embeds + pooled_prompt_embeds; Flux: the same names, other widths;
    a model with variable-length text: prompt_embeds + prompt_embeds_mask; an editing model adds its
    conditioning image's latents). Only the backbone reads the names; the loop only selects rows.
    `negative` is the unconditional side of true classifier-free guidance, with the same names."""

    tensors: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for side in (self.tensors, self.negative or {}) for name, t in side.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning tensors must share their batch size (dim 0), got {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        def pick(side):
            return None if side is None else {name: t[index] for name, t in side.items()}

        return Conditioning(pick(self.tensors), pick(self.negative))


class FlowBackbone(nn.Module):
    """Base class: a diffusers text-to-image flow-matching pipeline seen as a velocity model.

    Subclasses implement `_load_pipeline`, `_encode`, `_transformer_forward`, `initial_noise` and `decode`.
    """

    pipeline_class: type = None  # the stock diffusers pipeline class (also used to export LoRA)
    # The pipeline class whose `save_lora_weights` writes this backbone's LoRA; None: pipeline_class.
    lora_format_class: type = None

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: str = "float32",
        resolution: int = 512,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """
        Args:
            pretrained_model_name_or_path: a local diffusers pipeline directory or a hub id.
            torch_dtype: dtype of the transformer, VAE and text encoders ("float32", "bfloat16", "float16").
                The SDE and log-probability math always runs in float32.
            resolution: image height and width in pixels (a square image); `height` / `width` override it.
            max_sequence_length: T5 tokens per prompt.
            prompt_cache_size: how many prompts' embeddings to keep (the text encoders are frozen, so an
                embedding never changes); 0 disables the cache.
            offload_text_encoders: keep the text encoders in CPU memory and move them to the device only to
                encode prompts the cache does not hold (with a warm cache, never).
            offload_vae: keep the VAE in CPU memory and move it to the device only to decode.
            height, width: image height and width in pixels for non-square images; null: `resolution`.
        """
        super().__init__()
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.dtype_name = torch_dtype
        self.model_dtype = parse_dtype(torch_dtype)
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self.prompt_cache_size = prompt_cache_size
        for option, value in (("resolution", resolution), ("height", height), ("width", width)):
            if (value is not None or option == "resolution") and (not _is_int(value) or value < 16):
                raise ValueError(f"{OPTION}.{option} must be an integer >= 16 (pixels), got {value!r}")
        self.height = resolution if height is None else height
        self.width = resolution if width is None else width
        if not _is_int(max_sequence_length) or max_sequence_length < 1:
            raise ValueError(
                f"{OPTION}.max_sequence_length must be an integer >= 1 (T5 tokens), got "
                f"{max_sequence_length!r}"
            )
        if not _is_int(prompt_cache_size) or prompt_cache_size < 0:
            raise ValueError(
                f"{OPTION}.prompt_cache_size must be an integer >= 0 (0: no cache), got {prompt_cache_size!r}"
            )
        for option, value in (("offload_text_encoders", offload_text_encoders), ("offload_vae", offload_vae)):
            if not isinstance(value, bool):
                raise ValueError(f"{OPTION}.{option} must be true or false, got {value!r}")
        self.offload_text_encoders = offload_text_encoders
        self.offload_vae = offload_vae
        self._pipe = None
        self._prompt_cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.truncated_prompts = 0  # prompts longer than a text encoder takes, counted over the run

    # ----- loading
    @property
    def is_loaded(self) -> bool:
        return self._pipe is not None

    def load(self) -> None:
        """Build or load the pipeline, freeze every component, register the modules as children."""
        if self.is_loaded:
            return
        pipe = self._load_pipeline()
        for name in ("transformer", "vae", *TEXT_ENCODERS):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()
                setattr(self, name, module)  # registered as a child: moved by Lightning, in state_dict
        self._pipe = pipe
        # the pipeline's own factor (SD3, Flux, Qwen-Image, ... define it; Qwen-Image's VAE has no
        # block_out_channels), else the VAE's downsampling blocks
        vae_scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (
            len(pipe.vae.config.block_out_channels) - 1
        )
        self.vae_scale_factor = vae_scale
        # a square image is configured by `resolution`: name the option the config used
        square = self.height == self.width == self.resolution
        self.check_image_size(
            self.height, self.width, f"{OPTION}.resolution" if square else f"{OPTION}.height",
            f"{OPTION}.resolution" if square else f"{OPTION}.width",
        )

    def check_image_size(self, height: int, width: int, height_option: str, width_option: str) -> None:
        """Refuse a height or width this model cannot sample (not a multiple of the VAE's downsampling times
        the transformer's patching); the options are named as the caller's config writes them."""
        multiple = self.vae_scale_factor * self.latent_patch_multiple
        for option, size in ((height_option, height), (width_option, width)):
            if not _is_int(size) or size < 16:
                raise ValueError(f"{option} must be an integer >= 16 (pixels), got {size!r}")
            if size % multiple:
                lower = size // multiple * multiple
                nearest = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
                raise ValueError(
                    f"{option}={size} is not allowed for this model: it must be a "
                    f"multiple of {multiple} (VAE downsampling x{self.vae_scale_factor} times the "
                    f"transformer's patching x{self.latent_patch_multiple}), e.g. {nearest}"
                )

    @contextmanager
    def at_image_size(self, height: int, width: int, height_option: str, width_option: str):
        """Sample (noise, sigmas, decode) at `height` x `width` inside the block (an evaluation at another
        resolution than training); the trained size comes back on exit, whatever happens inside."""
        self.check_image_size(height, width, height_option, width_option)
        trained = self.height, self.width
        self.height, self.width = height, width
        try:
            yield
        finally:
            self.height, self.width = trained

    def _load_pipeline(self):
        path = self.pretrained_model_name_or_path
        option = f"{OPTION}.pretrained_model_name_or_path"
        if not path:
            raise ValueError(
                f"{type(self).__name__}: {option} is required (a local diffusers pipeline directory or a "
                f"hub id), got {path!r}"
            )
        if os.path.exists(path):
            self._check_pipeline_directory(path, option)
        elif _looks_like_local_path(path):
            raise ValueError(
                f"{option}={path!r}: no such directory; it must be a diffusers pipeline directory (as "
                "written by `save_pretrained`) or a hub id such as 'stabilityai/stable-diffusion-3.5-medium'"
            )
        # diffusers 0.42 renamed torch_dtype to dtype (the old name still works, with a warning).
        dtype_key = "dtype" if _DIFFUSERS_VERSION >= (0, 42) else "torch_dtype"
        try:
            return self.pipeline_class.from_pretrained(path, **{dtype_key: self.model_dtype})
        except OSError as e:
            if os.path.exists(path):
                raise
            # A misspelt hub id, a gated model without a token, or no network: diffusers says which.
            reason = str(e).rstrip(".")
            raise ValueError(
                f"{option}={path!r} could not be loaded as a hub id: {reason}. It must be a diffusers "
                "pipeline directory or a hub id that is cached locally or reachable (HF_HUB_OFFLINE=1 "
                "allows only cached ones)"
            ) from e

    def _check_pipeline_directory(self, path: str, option: str) -> None:
        index = os.path.join(path, "model_index.json")
        if not os.path.isdir(path) or not os.path.isfile(index):
            raise ValueError(
                f"{option}={path!r} is a local path without model_index.json: it must be a diffusers "
                "pipeline directory (as written by `save_pretrained`)"
            )
        try:
            with open(index, encoding="utf-8") as f:
                class_name = json.load(f).get("_class_name")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{option}={path!r}: model_index.json is not a JSON object ({e})") from None
        expected = self.pipeline_class.__name__
        if class_name is not None and class_name != expected:
            hint = BACKBONE_OF_PIPELINE.get(class_name)
            use = (
                f"use model.backbone.class_path: {hint}"
                if hint
                else f"guardrl loads {list(BACKBONE_OF_PIPELINE)}"
            )
            raise ValueError(
                f"{option}={path!r} holds a {class_name}, but {type(self).__name__} loads a {expected}: {use}"
            )

    @property
    def pipeline(self):
        if self._pipe is None:
            raise RuntimeError("the backbone is not loaded yet: call load() first")
        return self._pipe

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    # ----- what subclasses provide (the backbone contract, checked by tests/test_backbone_contract.py)
    latent_patch_multiple = 1
    # The transformer's repeated blocks, the units FSDP2 shards one by one (guardrl/sharding.py): names of
    # ModuleList attributes of the transformer.
    shard_block_names: tuple[str, ...] = ("transformer_blocks",)
    # Editing models take a conditioning image per prompt (encode_prompts(..., images=...)).
    takes_condition_image = False

    def lora_targets(self) -> list[str]:
        """The modules LoRA adapts when lora.target_modules is null (peft names: a module name or a dotted
        suffix). They must reach every block in `shard_block_names` (the contract test checks it)."""
        return ["to_q", "to_k", "to_v", "to_out.0"]

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning tensors of `prompts` (each (B, ...), named as `_transformer_forward` reads them)
        from the frozen text encoders (on `device` while this runs). Called with one prompt at a time."""
        raise NotImplementedError

    def _encode_condition_image(self, image: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Editing models: the conditioning tensors of one image (3, H, W) in [0, 1], each (1, ...)."""
        raise NotImplementedError

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate conditioning rows along the batch. Backbones whose text has a variable length pad
        here (and carry a mask)."""
        return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}

    def _transformer_forward(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The transformer's velocity at (latents, t (B,) sigmas) in the model dtype."""
        raise NotImplementedError

    def initial_noise(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], float32 (the VAE is on the latents' device). The VAE's
        scaling and shift come from its config, never from constants."""
        raise NotImplementedError

    @property
    def uses_true_cfg(self) -> bool:
        """True when guidance means two forwards (uncond + cond); Flux-dev's guidance is an embedding."""
        return True

    def image_seq_len(self) -> int | None:
        return None

    # ----- shared behaviour
    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The sampler's num_inference_steps + 1 sigmas, as the stock pipeline would set them (a backbone
        whose pipeline sets its schedule differently overrides this)."""
        return flow_match_sigmas(self.scheduler, num_inference_steps, self.image_seq_len())

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], with_negative: bool, images: list[torch.Tensor] | None = None
    ) -> Conditioning:
        """Embed prompts with the frozen text encoders, through a per-prompt cache; editing backbones also
        take one conditioning image (3, H, W) in [0, 1] per prompt."""
        if (images is not None) != self.takes_condition_image:
            needs = (
                "needs a conditioning image per prompt: set data.image_field (a JSONL prompt file with an "
                "image path on every line)"
                if self.takes_condition_image
                else "takes no images: set data.image_field to null, or use an editing backbone"
            )
            raise ValueError(f"{type(self).__name__} {needs}")
        device = self.transformer.device
        unique = list(dict.fromkeys(prompts + ([""] if with_negative else [])))
        missing = [p for p in unique if p not in self._prompt_cache]
        # One prompt per forward: a text encoder's output depends (by an ulp) on the batch it runs in, and
        # which prompts are missing depends on the cache's history, which a resumed run does not share.
        # Encoding alone keeps every embedding independent of history, so a resumed run is bitwise the
        # straight run.
        if missing:
            truncated = 0
            with (
                self._onloaded(self._offloaded_text_encoders(), device),
                _caught_truncations(self.pipeline) as seen,
            ):
                for prompt in missing:
                    before = len(seen)
                    encoded = self._encode([prompt], device)
                    self._prompt_cache[prompt] = {name: t[0:1] for name, t in encoded.items()}
                    truncated += len(seen) > before  # once per prompt, however many encoders cut it
            self._report_truncations(truncated)
        rows = [self._prompt_cache[p] for p in prompts]
        for p in unique:
            self._prompt_cache.move_to_end(p)
        negative_rows = [self._prompt_cache[""]] * len(prompts) if with_negative else None
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        if images is not None:
            if len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(images)} conditioning images")
            # the image conditions both sides of guidance: the edit, not the text, is what CFG amplifies
            image_rows = [self._encode_condition_image(image, device) for image in images]
            rows = [{**row, **image_row} for row, image_row in zip(rows, image_rows)]
            if negative_rows is not None:
                negative_rows = [{**row, **image_row} for row, image_row in zip(negative_rows, image_rows)]

        def on_device(side):
            return {name: t.to(device) for name, t in self.collate(side).items()}

        return Conditioning(on_device(rows), None if negative_rows is None else on_device(negative_rows))

    def _report_truncations(self, prompts_truncated: int) -> None:
        # diffusers logs every truncated prompt with the text it cut off (a 1 MB prompt: 1 MB of log per text
        # encoder); guardrl says it once per run, with a count.
        if not prompts_truncated:
            return
        first = self.truncated_prompts == 0
        self.truncated_prompts += prompts_truncated
        if first:
            _log.warning(
                "guardrl: a prompt is longer than the text encoders take (CLIP: 77 tokens; T5: "
                "model.backbone.init_args.max_sequence_length=%s) and was truncated; said once per run, the "
                "count is in %s.truncated_prompts",
                self.max_sequence_length,
                type(self).__name__,
            )

    def velocity(
        self,
        latents: torch.Tensor,
        t: float | torch.Tensor,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        transformer: nn.Module | None = None,
    ) -> torch.Tensor:
        """v(x, t) in float32, with classifier-free guidance in one batched forward when asked.

        Args:
            latents: (B, ...) float32 latents (cast to the model dtype for the forward).
            t: the sigma of the step (a float or a (B,) tensor).
            transformer: the module to run (the policy's, an old-policy copy in full fine-tuning, ...).
        """
        transformer = self.transformer if transformer is None else transformer
        batch = latents.shape[0]
        t_B = torch.as_tensor(t, dtype=torch.float32, device=latents.device).expand(batch)
        x = latents.to(self.model_dtype)
        use_cfg = self.uses_true_cfg and guidance_scale > 1.0
        if use_cfg:
            if cond.negative is None:
                raise ValueError("guidance_scale > 1 needs negative prompt embeddings (encode with_negative)")
            both = self.collate([cond.negative, cond.tensors])  # one batched forward: uncond, then cond
            v_uncond, v_cond = (
                self._transformer_forward(
                    transformer, torch.cat([x, x]), torch.cat([t_B, t_B]), both, guidance_scale
                )
                .float()
                .chunk(2)
            )
            return self._guide(v_uncond, v_cond, guidance_scale)
        return self._transformer_forward(transformer, x, t_B, cond.tensors, guidance_scale).float()

    def _guide(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of the two float32 velocities; a backbone whose pipeline guides otherwise
        (Qwen-Image rescales the result) overrides this."""
        return v_uncond + scale * (v_cond - v_uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], float32."""
        with self._onloaded(
            ["vae"] if self.offload_vae and getattr(self, "vae", None) is not None else [], latents.device
        ):
            return self._decode(latents)

    # ----- offloading (frozen modules kept in CPU memory between uses)
    def _offloaded_text_encoders(self) -> list[str]:
        if not self.offload_text_encoders:
            return []
        return [name for name in TEXT_ENCODERS if getattr(self, name, None) is not None]

    def offloaded_modules(self) -> list[str]:
        return self._offloaded_text_encoders() + (
            ["vae"] if self.offload_vae and getattr(self, "vae", None) is not None else []
        )

    def offload(self) -> None:
        """Move the offloaded modules to CPU memory (call after the trainer moved the model to its device)."""
        for name in self.offloaded_modules():
            getattr(self, name).to("cpu")

    @contextmanager
    def _onloaded(self, names: list[str], device: torch.device) -> Iterator[None]:
        for name in names:
            getattr(self, name).to(device)
        try:
            yield
        finally:
            for name in names:
                getattr(self, name).to("cpu")

    def latent_numel(self) -> int:
        """D, the number of latent elements per sample (the unit behind "mean" log-probs)."""
        g = torch.Generator().manual_seed(0)
        return self.initial_noise(1, g, torch.device("cpu"))[0].numel()


class SD3Backbone(FlowBackbone):
    """Stable Diffusion 3 / 3.5 (MMDiT, three text encoders, true classifier-free guidance)."""

    pipeline_class = StableDiffusion3Pipeline

    @property
    def latent_patch_multiple(self) -> int:
        return self.transformer.config.patch_size

    def _encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        # SD3 takes timesteps on the 0..1000 scale (t * num_train_timesteps).
        return transformer(
            hidden_states=latents,
            timestep=t.to(latents.dtype) * 1000.0,
            encoder_hidden_states=conditioning["prompt_embeds"].to(latents.dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(latents.dtype),
            return_dict=False,
        )[0]

    def _latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    def initial_noise(self, batch_size, generator, device):
        c = self.transformer.config.in_channels
        h, w = self._latent_hw()
        noise = torch.randn((batch_size, c, h, w), generator=generator, device=generator.device)
        return noise.to(device)

    @torch.no_grad()
    def _decode(self, latents):
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class PackedLatents:
    """Latents packed 2 x 2 into tokens, (B, h/2 * w/2, 4C), as FluxPipeline and QwenImagePipeline draw them
    (their `prepare_latents`: 2 * (height // (vae_scale_factor * 2)), the same for the width, then
    `_pack_latents`); the dynamic shift counts those tokens."""

    latent_patch_multiple = 2

    def _latent_hw(self) -> tuple[int, int]:
        unit = self.vae_scale_factor * 2
        return 2 * (self.height // unit), 2 * (self.width // unit)

    def image_seq_len(self) -> int:
        h, w = self._latent_hw()
        return (h // 2) * (w // 2)

    def initial_noise(self, batch_size, generator, device):
        # Qwen-Image draws (B, 1, C, h, w) (one frame): the same numbers in the same order as (B, C, h, w)
        c = self.transformer.config.in_channels // 4
        h, w = self._latent_hw()
        noise = torch.randn((batch_size, c, h, w), generator=generator, device=generator.device)
        return self.pipeline._pack_latents(noise, batch_size, c, h, w).to(device)


class FluxBackbone(PackedLatents, FlowBackbone):
    """FLUX.1 (packed 2x2 latents, rotary image/text ids, distilled guidance embedding, dynamic shift)."""

    pipeline_class = FluxPipeline
    shard_block_names = ("transformer_blocks", "single_transformer_blocks")  # double, then single blocks

    @property
    def uses_true_cfg(self) -> bool:
        return False

    def _encode(self, prompts, device):
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        h, w = self._latent_hw()
        img_ids = self.pipeline._prepare_latent_image_ids(
            latents.shape[0], h // 2, w // 2, latents.device, latents.dtype
        )
        prompt_embeds = conditioning["prompt_embeds"]
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full(
                (latents.shape[0],), guidance_scale, device=latents.device, dtype=torch.float32
            )
        # Flux takes sigma-scale timesteps (FluxPipeline passes timestep / 1000).
        return transformer(
            hidden_states=latents,
            timestep=t.to(latents.dtype),
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"].to(latents.dtype),
            encoder_hidden_states=prompt_embeds.to(latents.dtype),
            # FluxPipeline's text ids are all zeros, one row per text token.
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=img_ids,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def _decode(self, latents):
        vae = self.vae
        unpacked = self.pipeline._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
        z = unpacked.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
