"""Qwen-Image-Edit (diffusers `QwenImageEditPipeline`): Qwen-Image with one conditioning image per prompt.

What editing adds to Qwen-Image (guardrl/policy/qwen_image.py; the ground truth is
`QwenImageEditPipeline.__call__`, diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py of the installed
diffusers, called with one PIL image, as its documentation does):
- size: the image is resized (PIL, Lanczos) to the pipeline's `calculate_dimensions(1024 * 1024, w / h)`: its
  aspect ratio at about 1024^2 px, each side a multiple of 32; `condition_image_size` S: the same rule at
  S^2 px (Flow-Factory's `condition_image_size`);
- text: the prompt goes through the Qwen2.5-VL encoder TOGETHER WITH the resized image (the chat template
  holds `<|vision_start|><|image_pad|><|vision_end|>` before the prompt, expanded by the Qwen2-VL processor
  to one token per 2x2 merged 14 px patch); the first 64 tokens (the system prompt) are dropped, the
  image's tokens are kept. So a row's text embeddings depend on its image: rows are cached per (prompt,
  image), and the negative prompt "" is encoded with each image too. The pipeline cuts nothing (no
  `max_sequence_length`);
- image latents: the resized image in [-1, 1], VAE-encoded (the distribution's mode), normalised by the VAE's
  `latents_mean` / `latents_std`, packed 2x2 like the noise;
- forward: the image tokens are concatenated after the noise tokens, `img_shapes` lists both grids, and only
  the noise tokens' velocity is kept. Schedule (token count of the noise only), timestep, true CFG with the
  norm rescale and decoding are Qwen-Image's.

The tiny version (`TinyQwenImageEditBackbone`) builds a real `QwenImageEditPipeline` in code: a Qwen2.5-VL
text encoder whose vision tower now runs, a byte-level BPE tokenizer whose merges make the system prompt the
64 tokens the pipeline drops, and a Qwen2-VL processor. transformers 5.24 cannot build `Qwen2VLProcessor`
without torchvision (its video processor's base class, `VideoProcessorMixin`, is only defined with it, and
the processor checks every sub-processor's class, even a None one); `ImageOnlyQwen2VLProcessor` is the same
processor without the video slot (guardrl never passes videos), and the backbone loads a pipeline's
processor/ folder with it, so loading works with or without torchvision.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from guardrl.policy.backbones import OPTION, Conditioning, _is_int
from guardrl.policy.qwen_image import (
    QWEN_IMAGE_SCHEDULER,
    QWEN_IMAGE_TEXT_WIDTH,
    QWEN_IMAGE_VAE,
    SMALL_QWEN_IMAGE_TRANSFORMER,
    SMALL_QWEN_IMAGE_VAE,
    SPECIAL_TOKENS,
    TEMPLATE_TAIL_TOKENS,
    QwenImageBackbone,
    _bpe,
    _qwen_text_encoder,
    build_qwen_image_transformer,
    make_tiny_qwen_image_pipeline,
)
from guardrl.policy.random_weights import _cast, _default_dtype, prompt_seed
from guardrl.policy.tiny import TINY_WORDS, _bytes_to_unicode, _eval

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
STOCK_CONDITION_AREA = 1024 * 1024  # QwenImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, ...)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor: the same text and image processing (the class's own
    `__call__`), constructible and loadable without torchvision (see the module docstring)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB PIL image, rounding to 8 bits (exact for images read from 8-bit files,
    as guardrl's data loader reads them: k / 255)."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def _digest(image: torch.Tensor) -> str:
    data = image.detach().float().cpu().contiguous().numpy()
    return hashlib.sha1(str(data.shape).encode() + data.tobytes()).hexdigest()


class QwenImageEditBackbone(QwenImageBackbone):
    """Qwen-Image-Edit (Qwen/Qwen-Image-Edit): Qwen-Image conditioned on one image per prompt
    (data.image_field), the image seen both by the Qwen2.5-VL text encoder and as latent tokens."""

    pipeline_class = QwenImageEditPipeline
    takes_condition_image = True

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: str = "float32",
        resolution: int = 1024,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        condition_image_size: int | None = None,
    ) -> None:
        """
        Args:
            condition_image_size: the conditioning image keeps its aspect ratio and is resized to about
                condition_image_size^2 px (each side rounded to a multiple of 32); null: 1024^2 px, what
                QwenImageEditPipeline does. All images of a batch must come out the same size.
            The other arguments: see FlowBackbone. There is no max_sequence_length: QwenImageEditPipeline
            keeps every text and image token.
        """
        super().__init__(
            pretrained_model_name_or_path,
            torch_dtype,
            resolution,
            max_sequence_length=1024,  # not applied: the edit pipeline cuts nothing
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
            offload_vae=offload_vae,
            height=height,
            width=width,
        )
        size = condition_image_size
        if size is not None and (not _is_int(size) or size < 32):
            raise ValueError(
                f"{OPTION}.condition_image_size must be null (about 1024 x 1024 px, as "
                f"QwenImageEditPipeline) or an integer >= 32 (the side in pixels of the area the image is "
                f"resized to, keeping its aspect ratio), got {condition_image_size!r}"
            )
        self.condition_image_size = condition_image_size
        self._image_rows: OrderedDict[str, tuple[Image.Image, dict[str, torch.Tensor]]] = OrderedDict()

    # ----- loading
    def _load_pipeline(self):
        # The stock from_pretrained, with the processor/ folder read by ImageOnlyQwen2VLProcessor.
        self.pipeline_class = _ImageOnlyProcessorLoader
        try:
            return super()._load_pipeline()
        finally:
            del self.pipeline_class

    # ----- the conditioning image
    @property
    def condition_area(self) -> int:
        size = self.condition_image_size
        return STOCK_CONDITION_AREA if size is None else size * size

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of height x width px is resized to, as QwenImageEditPipeline computes
        it."""
        new_width, new_height, _ = pipeline_qwenimage_edit.calculate_dimensions(
            self.condition_area, width / height
        )
        if new_width < 32 or new_height < 32:
            raise ValueError(
                f"{type(self).__name__}: a {height} x {width} px conditioning image comes out "
                f"{new_height} x {new_width} px at {OPTION}.condition_image_size="
                f"{self.condition_image_size}: "
                "use a larger condition_image_size, or an image of a less extreme aspect ratio"
            )
        return int(new_height), int(new_width)

    @torch.no_grad()
    def _condition_image(self, image: torch.Tensor, device: torch.device):
        """(the resized PIL image the text encoder sees, its latent rows), cached by the image's bytes."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"{type(self).__name__}: a conditioning image must be a (3, H, W) tensor in [0, 1] (RGB), "
                f"got {shape}"
            )
        key = _digest(image)
        if key in self._image_rows:
            self._image_rows.move_to_end(key)
            pil, rows = self._image_rows[key]
            return key, pil, {name: t.to(device) for name, t in rows.items()}
        pipe = self.pipeline
        height, width = self.condition_size(*image.shape[1:])
        pil = pipe.image_processor.resize(to_pil(image), height, width)  # PIL, the processor's Lanczos
        pixels = pipe.image_processor.preprocess(pil, height, width).unsqueeze(2)  # (1, 3, 1, H, W)
        with self._onloaded(["vae"] if self.offload_vae else [], device):
            # prepare_latents: the image in the prompt embeddings' dtype (the text encoder's), then the mode
            latents = pipe._encode_vae_image(pixels.to(device, self.model_dtype), generator=None)
        latents = latents.to(self.model_dtype)
        channels, latent_h, latent_w = latents.shape[1], latents.shape[3], latents.shape[4]
        packed = pipe._pack_latents(latents, 1, channels, latent_h, latent_w)
        grid = torch.tensor([[1, latent_h // 2, latent_w // 2]], device=device)
        rows = {"image_latents": packed, "image_grid": grid}
        self._image_rows[key] = (pil, rows)
        while len(self._image_rows) > max(self.prompt_cache_size, 1):
            self._image_rows.popitem(last=False)
        return key, pil, rows

    def _encode_with_image(self, prompt: str, pil: Image.Image, device) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipeline._get_qwen_prompt_embeds([prompt], image=pil, device=device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.to(torch.long)}

    @torch.no_grad()
    def encode_prompts(self, prompts, with_negative, images=None):
        if images is None:
            raise ValueError(
                f"{type(self).__name__} needs a conditioning image per prompt: set data.image_field (a JSONL "
                "prompt file with an image path on every line)"
            )
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} conditioning images")
        device = self.transformer.device
        rows, negative_rows = [], []
        with self._onloaded(self._offloaded_text_encoders(), device):
            for prompt, image in zip(prompts, images):
                key, pil, image_row = self._condition_image(image, device)
                sides = [(prompt, rows)] + ([("", negative_rows)] if with_negative else [])
                for text, out in sides:
                    # One (prompt, image) per forward, cached: a row never depends on its batch or on the
                    # cache's history (a resumed run is bitwise the straight run).
                    cache_key = (text, key)
                    if cache_key not in self._prompt_cache:
                        encoded = self._encode_with_image(text, pil, device)
                        self._prompt_cache[cache_key] = {name: t[0:1] for name, t in encoded.items()}
                    self._prompt_cache.move_to_end(cache_key)
                    out.append({**self._prompt_cache[cache_key], **image_row})
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)

        def on_device(side):
            return {name: t.to(device) for name, t in self.collate(side).items()}

        return Conditioning(on_device(rows), on_device(negative_rows) if with_negative else None)

    def collate(self, rows):
        sizes = {tuple(row["image_latents"].shape[1:]) for row in rows if "image_latents" in row}
        if len(sizes) > 1:
            raise ValueError(
                f"{type(self).__name__}: the conditioning images of one batch have different sizes after "
                f"resizing ({sorted(sizes)} tokens x channels): use images of one aspect ratio (each is "
                f"resized to about {OPTION}.condition_image_size^2 px keeping its aspect ratio)"
            )
        return super().collate(rows)

    # ----- the forward
    def _transformer_forward(self, transformer, latents, t, conditioning, guidance_scale):
        h, w = self._latent_hw()
        tokens = latents.shape[1]
        embeds = conditioning["prompt_embeds"].to(latents.dtype)
        mask = conditioning["prompt_embeds_mask"]
        mask = None if bool(mask.all()) else mask  # as encode_prompt: no mask when nothing is padded
        # every row's image has the same grid (collate checks it): one img_shapes entry serves the batch
        image_grid = tuple(int(v) for v in conditioning["image_grid"][0].tolist())
        hidden = torch.cat([latents, conditioning["image_latents"].to(latents.dtype)], dim=1)
        velocity = transformer(
            hidden_states=hidden,
            timestep=t.to(latents.dtype),  # sigma scale: the pipeline passes timestep / 1000
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, h // 2, w // 2), image_grid]] * latents.shape[0],
            return_dict=False,
        )[0]
        return velocity[:, :tokens]  # the image tokens' outputs are not a velocity of anything


def _from_pretrained_with_image_only_processor(path, **kwargs) -> QwenImageEditPipeline:
    """The stock QwenImageEditPipeline.from_pretrained, its processor/ folder read by
    ImageOnlyQwen2VLProcessor (a directory or a hub id)."""
    processor = ImageOnlyQwen2VLProcessor.from_pretrained(path, subfolder="processor")
    return QwenImageEditPipeline.from_pretrained(path, processor=processor, **kwargs)


# What FlowBackbone._load_pipeline calls as `pipeline_class` while QwenImageEditBackbone loads: the class's
# name (for the model_index.json check) and the loader above.
_ImageOnlyProcessorLoader = SimpleNamespace(
    __name__=QwenImageEditPipeline.__name__, from_pretrained=_from_pretrained_with_image_only_processor
)


# ---------------------------------------------------------------------------------------------------- tiny
def make_qwen_edit_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer whose merges make every pre-token of QwenImageEditPipeline's chat
    template and of TINY_WORDS one token, so that the template's system prompt is the 64 tokens the pipeline
    drops (`prompt_template_encode_start_idx`), as with the released tokenizer; the chat and vision special
    tokens are added after (the vision ones last: `make_tiny_qwen_image_edit_pipeline`)."""
    alphabet = _bytes_to_unicode()
    pre_tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])
    pre_tokenizer = pre_tokenizer.backend_tokenizer.pre_tokenizer
    text = _EDIT_TEMPLATE
    for special in SPECIAL_TOKENS + VISION_TOKENS:
        text = text.replace(special, "\0")
    texts = [part for part in text.replace("{}", "\0").split("\0") if part] + [" ".join(TINY_WORDS)]
    forms = [form for part in texts for form, _ in pre_tokenizer.pre_tokenize_str(part)]
    forms += [form for word in TINY_WORDS for form, _ in pre_tokenizer.pre_tokenize_str(word)]
    vocab = {c: i for i, c in enumerate(alphabet)}
    ranks: dict[tuple[str, str], int] = {}
    for form in dict.fromkeys(forms):
        # as make_qwen_tokenizer: merges appended later never change how an earlier form tokenizes
        pieces = _bpe(list(form), ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks.setdefault((current, piece), len(ranks))
            current += piece
            vocab.setdefault(current, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=sorted(ranks, key=ranks.get), model_max_length=2048)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


# QwenImageEditPipeline.__init__'s prompt_template_encode (read from a pipeline built without components)
def _edit_template() -> str:
    pipe = QwenImageEditPipeline.__new__(QwenImageEditPipeline)
    # __init__ only registers modules and sets constants; with no VAE it uses its defaults
    QwenImageEditPipeline.__init__(pipe, None, None, None, None, None, None)
    return pipe.prompt_template_encode


_EDIT_TEMPLATE = _edit_template()

# The tiny processor sees a conditioning image at 56 x 56 to 112 x 112 px: 2 x 2 to 4 x 4 merged patches.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def make_tiny_qwen_image_edit_pipeline(seed: int = 0, num_layers: int = 2) -> QwenImageEditPipeline:
    """A QwenImageEditPipeline with tiny random weights: the tiny Qwen-Image transformer, VAE and scheduler
    (guardrl/policy/qwen_image.py), a Qwen2.5-VL text encoder with a one-block vision tower, the tokenizer of
    `make_qwen_edit_tokenizer` and an image-only Qwen2-VL processor (14 px patches merged 2 x 2, as released,
    but at most 112 x 112 px)."""
    tokenizer = make_qwen_edit_tokenizer()
    # _qwen_text_encoder places the vision token ids right after the tokenizer's vocabulary; adding the three
    # vision tokens now gives them exactly those ids.
    text_encoder = _qwen_text_encoder(tokenizer, 16, seed + 2)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in VISION_TOKENS])
    config = text_encoder.config
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert ids == [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id], ids
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS),
        tokenizer=tokenizer,
    )
    # the tiny Qwen-Image transformer, VAE and scheduler, seeded as make_tiny_qwen_image_pipeline seeds them
    base = make_tiny_qwen_image_pipeline(seed, num_layers).components
    pipe = QwenImageEditPipeline(
        transformer=base["transformer"],
        scheduler=base["scheduler"],
        vae=base["vae"],
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
    )
    # model_index.json names the processor as the released pipeline's does (transformers Qwen2VLProcessor),
    # not by this subclass's module, so that a save_pretrained directory reads like a released one
    pipe.register_to_config(processor=("transformers", "Qwen2VLProcessor"))
    return _eval(pipe)


def example_condition_images(count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` distinct random 8-bit images (3, 40, 32) in [0, 1] (k / 255, as read from a PNG): the
    conditioning images tests/test_backbone_contract.py gives the tiny and random-weight backbones."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 40, 32), generator=generator) / 255.0 for _ in range(count)]


class StockPerImageQwenImageEditPipeline(QwenImageEditPipeline):
    """QwenImageEditPipeline whose `__call__` is the stock one, called once per image, for the two inputs the
    stock call cannot take (tests/test_backbone_contract.py passes them):
    - a batch of tensor images (B, 3, H, W) in [0, 1]: the stock call reads `image.size` as PIL's (W, H) and
      fails on a tensor, and with a list of images it hands the text encoder the images before resizing;
      each image is passed as one PIL image (`to_pil`), as the pipeline documents, with its prompt and its
      row of `latents`;
    - a condition area other than 1024^2 px (`condition_area`): the stock call's constant, swapped in
      `calculate_dimensions` for the call (tests/test_qwen_image_edit.py checks the unchanged stock pipeline
      at 1024^2 px against the backbone)."""

    condition_area = STOCK_CONDITION_AREA

    @contextmanager
    def _area(self):
        original = pipeline_qwenimage_edit.calculate_dimensions
        area = self.condition_area
        pipeline_qwenimage_edit.calculate_dimensions = lambda _, ratio: original(area, ratio)
        try:
            yield
        finally:
            pipeline_qwenimage_edit.calculate_dimensions = original

    def __call__(self, image=None, prompt=None, latents=None, **kwargs):
        images = list(image) if isinstance(image, (list, tuple)) or image.ndim == 4 else [image]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        outputs = []
        with self._area():
            for i, (row, text) in enumerate(zip(images, prompts)):
                pil = to_pil(row) if isinstance(row, torch.Tensor) else row
                noise = None if latents is None else latents[i : i + 1]
                outputs.append(super().__call__(image=pil, prompt=text, latents=noise, **kwargs).images)
        if isinstance(outputs[0], torch.Tensor):
            return type("Output", (), {"images": torch.cat(outputs)})()
        return type("Output", (), {"images": [im for out in outputs for im in out]})()


class TinyQwenImageEditBackbone(QwenImageEditBackbone):
    """The tiny random-weight Qwen-Image-Edit pipeline, built in code from a seed (no files, no hub);
    conditioning images are resized to about 32 x 32 px unless `condition_image_size` says otherwise (null:
    the pipeline's 1024^2 px, about 7 s of VAE per image on a CPU)."""

    def __init__(
        self,
        seed: int = 0,
        num_layers: int = 2,
        resolution: int = 128,
        prompt_cache_size: int = 4096,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        condition_image_size: int | None = 32,
    ):
        super().__init__(
            None,
            "float32",
            resolution,
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
            offload_vae=offload_vae,
            height=height,
            width=width,
            condition_image_size=condition_image_size,
        )
        if not (_is_int(num_layers) and num_layers >= 1):
            raise ValueError(f"{OPTION}.num_layers must be an integer >= 1, got {num_layers!r}")
        self.seed = seed
        self.num_layers = num_layers

    def _load_pipeline(self):
        return make_tiny_qwen_image_edit_pipeline(self.seed, self.num_layers)

    def stock_pipeline(self) -> QwenImageEditPipeline:
        """A fresh pipeline with the same weights: the stock call once per image at this backbone's condition
        area (`StockPerImageQwenImageEditPipeline`)."""
        pipe = StockPerImageQwenImageEditPipeline(**self._load_pipeline().components)
        pipe.condition_area = self.condition_area
        return _eval(pipe)

    def stock_call_kwargs(self, guidance_scale: float) -> dict:
        """The stock call's arguments that match this backbone's sampling: true CFG needs a negative prompt
        (guardrl's is ""); guidance_scale=None (the transformer has no guidance embedding)."""
        kwargs: dict = {"true_cfg_scale": guidance_scale}
        if guidance_scale > 1.0:
            kwargs["negative_prompt"] = ""
        return kwargs

    example_condition_images = staticmethod(example_condition_images)


# ----- the published shapes with random weights (for speed and memory; see guardrl/policy/random_weights.py)
class RandomQwenImageEditBackbone(QwenImageEditBackbone):
    """Qwen-Image-Edit's transformer (Qwen-Image's, at its published shape: build_qwen_image_transformer) and
    VAE with random weights; no text encoder: a (prompt, image) pair's embeddings are random (1, L, 3584)
    rows seeded by the prompt and the image, L = one token per word, the image's vision tokens (one per
    28 x 28 px of the resized image) and the template's 5 trailing tokens. The image latents are the VAE's.
    For timing and memory only."""

    def __init__(
        self,
        torch_dtype: str = "float32",
        resolution: int = 1024,
        small: bool = False,
        seed: int = 0,
        prompt_cache_size: int = 4096,
        offload_vae: bool = False,
        height: int | None = None,
        width: int | None = None,
        condition_image_size: int | None = None,
    ) -> None:
        super().__init__(
            None,
            torch_dtype,
            resolution,
            prompt_cache_size,
            offload_text_encoders=False,
            offload_vae=offload_vae,
            height=height,
            width=width,
            condition_image_size=condition_image_size,
        )
        if not isinstance(small, bool):
            raise ValueError(f"{OPTION}.small must be true or false, got {small!r}")
        self.small = small
        self.seed = seed

    def _load_pipeline(self):
        transformer = build_qwen_image_transformer(self.small, self.model_dtype, self.seed)
        torch.manual_seed(self.seed + 1)
        with _default_dtype(self.model_dtype):
            shape = dict(QWEN_IMAGE_VAE, **(SMALL_QWEN_IMAGE_VAE if self.small else {}))
            vae = AutoencoderKLQwenImage(**shape)
        return QwenImageEditPipeline(
            transformer=transformer,
            vae=_cast(vae, self.model_dtype),
            scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
            text_encoder=None,
            tokenizer=None,
            processor=None,
        )

    def _encode_with_image(self, prompt, pil, device):
        width = SMALL_QWEN_IMAGE_TRANSFORMER["joint_attention_dim"] if self.small else QWEN_IMAGE_TEXT_WIDTH
        vision = (pil.height // 28) * (pil.width // 28)
        length = len(prompt.split()) + vision + 2 + TEMPLATE_TAIL_TOKENS  # + vision start and end
        image_seed = int(_digest(torch.from_numpy(np.asarray(pil).copy()))[:8], 16)
        generator = torch.Generator().manual_seed(prompt_seed(prompt, self.seed) ^ image_seed)
        embeds = torch.randn(1, length, width, generator=generator).to(device, self.model_dtype)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": torch.ones(1, length, dtype=torch.long)}

    example_condition_images = staticmethod(example_condition_images)
