"""GenEval as a guardrl reward, on transformers: a Mask2Former instance segmenter finds the objects, a CLIP
zero-shot classifier names their colours, and GenEval's rules (`geneval_rules`) score the image against
its prompt's metadata.

GenEval itself runs an mmdetection Mask2Former (Swin-S, COCO instance) that pins old mmcv/mmdet builds; here
the detector is any transformers `Mask2FormerForUniversalSegmentation` COCO instance checkpoint (default
`facebook/mask2former-swin-small-coco-instance`, the same architecture and training data; the weights are
the Mask2Former authors', not mmdetection's, so detections, and so scores, are close to GenEval's but not
identical). The detector is pluggable: anything callable as `detector(images) -> list[{class: [Detection]}]`
with images (B, H, W, 3) uint8, so GenEval's own mmdet stack can sit behind it in a served environment.

What follows GenEval exactly (read in `evaluation/evaluate_images.py` of github.com/djghosh13/geneval and
mmdetection's `MaskFormerFusionHead`, not copied):
* detections: the top `max_per_image` (query, class) pairs by class probability; mask logits upsampled
  bilinearly to the padded input, cropped to the resized image, upsampled to the original size, binarised at
  0; score = class probability x the mean sigmoid inside the mask; box = the mask's extent (x2, y2 exclusive);
* colour: each object is pasted on a #999 grey image through its mask and cropped to its box, then CLIP
  ViT-L/14 (OpenAI weights: open_clip's "ViT-L-14"/"openai" are `openai/clip-vit-large-patch14`) picks
  one of GenEval's 10 colours, each colour's text embedding being the renormalised mean of the normalised
  embeddings of "a photo of a {c} {class}", "a photo of a {c}-colored {class}" and "a photo of a {c} object".
  The crop is resized by the CLIP processor on PIL (open_clip's transform: resize shortest side bicubic,
  center crop; torchvision rounds the crop offset where transformers floors it: at most one pixel).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from guardrl.rewards.base import Reward, build_component
from guardrl.rewards.clip_rewards import _features, freeze, resolve_dtype
from guardrl.rewards.geneval_rules import (
    COCO_TO_GENEVAL,
    COLORS,
    GENEVAL_CLASSES,
    Detection,
    Thresholds,
    Verdict,
    judge,
    load_metadata,
    select_objects,
)

COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
SCORES = ("partial", "correct", "strict")

Detector = Callable[[torch.Tensor], list]  # (B, H, W, 3) uint8 -> one {class name: [Detection]} per image


def mask_to_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """The extent of a (H, W) bool mask as (x1, y1, x2, y2), x2/y2 exclusive (mmdetection's mask2bbox);
    an empty mask gives (0, 0, 0, 0)."""
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if len(cols) == 0 or len(rows) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def instance_detections(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    input_hw: tuple[int, int],
    resized_hw: tuple[int, int],
    image_hw: tuple[int, int],
    max_per_image: int = 100,
) -> list[tuple[int, float, torch.Tensor]]:
    """One image's Mask2Former output -> [(label, score, (H, W) bool mask)] (module docstring).

    class_logits: (Q, C + 1), the last class being "no object"; mask_logits: (Q, h, w) at the model's
    resolution of the padded input `input_hw`; `resized_hw` is the image inside the padding; `image_hw` the
    original size."""
    masks = F.interpolate(mask_logits[None].float(), size=input_hw, mode="bilinear", align_corners=False)
    masks = masks[:, :, : resized_hw[0], : resized_hw[1]]
    masks = F.interpolate(masks, size=image_hw, mode="bilinear", align_corners=False)[0]
    probs = class_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    top_scores, top = probs.flatten().topk(min(max_per_image, probs.numel()), sorted=True)
    # Per query, once (a query can be picked for several classes): its binary mask and mean probability
    # inside.
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return [
        (index % num_classes, score * float(mask_scores[index // num_classes]), binary[index // num_classes])
        for score, index in zip(top_scores.tolist(), top.tolist())
    ]


def geneval_label_names(id2label: dict) -> list[str]:
    """A COCO detector's label names in id order, renamed to GenEval's; refuses labels GenEval lacks."""
    names = []
    for label_id in sorted(int(i) for i in id2label):
        name = id2label.get(label_id, id2label.get(str(label_id)))
        name = COCO_TO_GENEVAL.get(name, name)
        if name not in GENEVAL_CLASSES:
            raise ValueError(
                f"GenEval detector: label {label_id} {name!r} is not one of GenEval's 80 COCO classes;"
                " use a COCO instance-segmentation checkpoint (e.g. "
                "facebook/mask2former-swin-small-coco-instance)"
            )
        names.append(name)
    return names


class Mask2FormerDetector(torch.nn.Module):
    """A transformers Mask2Former COCO instance segmenter (local path or hub id), frozen; images (B, H, W, 3)
    uint8 -> per image {GenEval class name: [Detection]}."""

    def __init__(
        self,
        pretrained: str = "facebook/mask2former-swin-small-coco-instance",
        torch_dtype: str = "float32",
        max_per_image: int = 100,
    ) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        try:
            import scipy  # transformers builds Mask2Former's (training) loss with it

            del scipy
        except ImportError:
            raise ImportError(
                "Mask2FormerDetector (GenEval's detector) needs scipy, which transformers' "
                "Mask2Former requires: pip install 'guardrl[geneval]' (or pip install scipy)"
            ) from None
        if isinstance(max_per_image, bool) or not isinstance(max_per_image, int) or max_per_image < 1:
            raise ValueError(f"Mask2FormerDetector: max_per_image={max_per_image!r} must be an int >= 1")
        self.max_per_image = max_per_image
        self.dtype = resolve_dtype(torch_dtype)
        self.processor = AutoImageProcessor.from_pretrained(pretrained)
        self.model = freeze(Mask2FormerForUniversalSegmentation.from_pretrained(pretrained, dtype=self.dtype))
        self.label_names = geneval_label_names(self.model.config.id2label)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[dict[str, list[Detection]]]:
        from PIL import Image

        arrays = images.cpu().numpy()
        inputs = self.processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(
            pixel_values=inputs["pixel_values"].to(device=device, dtype=self.dtype),
            pixel_mask=inputs["pixel_mask"].to(device),
        )
        input_hw = tuple(inputs["pixel_values"].shape[-2:])
        results = []
        for i, array in enumerate(arrays):
            valid = inputs["pixel_mask"][i].bool()
            resized_hw = (int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum()))
            found: dict[str, list[Detection]] = {}
            for label, score, mask in instance_detections(
                out.class_queries_logits[i],
                out.masks_queries_logits[i],
                input_hw,
                resized_hw,
                array.shape[:2],
                self.max_per_image,
            ):
                found.setdefault(self.label_names[label], []).append(
                    Detection(box=mask_to_box(mask), score=score, mask=mask.cpu().numpy())
                )
            results.append(found)
        return results


def object_crop(image: np.ndarray, detection: Detection, background=(153, 153, 153), crop: bool = True):
    """GenEval's colour-classifier input: the object pasted on a plain background through its mask (the
    whole image when there is no mask), cropped to its box (PIL rounds the box to whole pixels)."""
    from PIL import Image

    if detection.mask is not None:
        if detection.mask.shape != image.shape[:2]:
            raise ValueError(
                f"GenEval: a detection mask of shape {detection.mask.shape} on an image of {image.shape[:2]}"
            )
        image = np.where(detection.mask[..., None], image, np.asarray(background, dtype=np.uint8))
    pil = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    return pil.crop(tuple(detection.box)) if crop else pil


class ClipColorClassifier(torch.nn.Module):
    """GenEval's zero-shot colour classifier on a transformers CLIP (module docstring)."""

    def __init__(
        self,
        pretrained: str = "openai/clip-vit-large-patch14",
        processor: Optional[str] = None,
        torch_dtype: str = "float32",
        background: str = "#999",
        crop: bool = True,
    ) -> None:
        super().__init__()
        from PIL import ImageColor
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.background = ImageColor.getrgb(background)[:3]
        except (ValueError, AttributeError):
            raise ValueError(
                f"ClipColorClassifier: background={background!r} must be a PIL colour such as "
                "'#999' (GenEval's default)"
            ) from None
        self.crop = crop
        self.dtype = resolve_dtype(torch_dtype)
        self.processor = CLIPProcessor.from_pretrained(processor or pretrained)
        self.model = freeze(CLIPModel.from_pretrained(pretrained, dtype=self.dtype))
        self._weights: dict[str, torch.Tensor] = {}

    def color_weights(self, classname: str) -> torch.Tensor:
        """(D, 10): per colour, the renormalised mean of the normalised template embeddings; cached."""
        if classname not in self._weights:
            device = self.model.logit_scale.device
            columns = []
            for color in COLORS:
                texts = [t.format(color=color, object=classname) for t in COLOR_TEMPLATES]
                tokens = self.processor(text=texts, padding=True, return_tensors="pt")
                features = _features(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(device),
                        attention_mask=tokens["attention_mask"].to(device),
                    )
                )
                mean = F.normalize(features.float(), dim=-1).mean(dim=0)
                columns.append(mean / mean.norm())
            self._weights[classname] = torch.stack(columns, dim=1)
        return self._weights[classname]

    @torch.no_grad()
    def forward(self, image: np.ndarray, classname: str, objects: list[Detection]) -> list[str]:
        if not objects:
            return []
        crops = [object_crop(image, d, self.background, self.crop) for d in objects]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]
        features = _features(
            self.model.get_image_features(
                pixel_values=pixels.to(device=self.model.logit_scale.device, dtype=self.dtype)
            )
        )
        logits = 100.0 * F.normalize(features.float(), dim=-1) @ self.color_weights(classname)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


class GenEval(Reward):
    """GenEval's compositional check as a reward (module docstring; rules in `geneval_rules`).

    Args:
        metadata: a .jsonl of GenEval metadata records (prompt, tag, include, exclude), e.g. FlowGRPO's
            dataset/geneval/train_metadata.jsonl; every prompt scored must be in it (train on the same file).
        detector: a Mask2Former path / hub id, a {class_path, init_args} dict, or a callable (see `Detector`).
        color_classifier: a CLIP path / hub id, a {class_path, init_args} dict, or a callable
            (image (H, W, 3) uint8, class name, objects) -> colour names.
        score: "partial" (FlowGRPO's training reward, the default), "correct" (GenEval's 0/1 metric) or
            "strict" (0/1 with exact counts).
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: GenEval's options.
    """

    def __init__(
        self,
        metadata: str,
        detector="facebook/mask2former-swin-small-coco-instance",
        color_classifier="openai/clip-vit-large-patch14",
        score: str = "partial",
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        max_overlap: float = 1.0,
        position_threshold: float = 0.1,
        weight: float = 1.0,
        name: Optional[str] = "geneval",
    ) -> None:
        super().__init__(weight=weight, name=name)
        if score not in SCORES:
            raise ValueError(f"reward {self.name!r}: score={score!r} must be one of {list(SCORES)}")
        for option, value in (
            ("threshold", threshold),
            ("counting_threshold", counting_threshold),
            ("max_overlap", max_overlap),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"reward {self.name!r}: {option}={value!r} must be a number in [0, 1]")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise ValueError(f"reward {self.name!r}: max_objects={max_objects!r} must be an int >= 1")
        if (
            isinstance(position_threshold, bool)
            or not isinstance(position_threshold, (int, float))
            or position_threshold < 0
        ):
            raise ValueError(
                f"reward {self.name!r}: position_threshold={position_threshold!r} must be a number >= 0"
            )
        self.score_kind = score
        self.thresholds = Thresholds(
            threshold, counting_threshold, max_objects, max_overlap, position_threshold
        )
        self.metadata_path = metadata
        self.metadata = load_metadata(metadata)
        self.detector = build_component(
            detector,
            Mask2FormerDetector,
            f"reward {self.name!r}: detector",
            "images (B, H, W, 3) uint8 -> list of {class: [Detection]}",
        )
        self.color_classifier = build_component(
            color_classifier,
            ClipColorClassifier,
            f"reward {self.name!r}: color_classifier",
            "(image, class name, objects) -> colour names",
        )

    def _metadata_for(self, prompt: str) -> dict:
        record = self.metadata.get(prompt)
        if record is None:
            raise ValueError(
                f"reward {self.name!r}: prompt {prompt[:120]!r} is not in metadata="
                f"{self.metadata_path!r} ({len(self.metadata)} prompts); GenEval scores only prompts "
                "it has metadata for: train on the same file (data.train_prompts)"
            )
        return record

    def verdicts(self, images: torch.Tensor, prompts: list[str]) -> list[Verdict]:
        """Every score of each image, and the reasons it failed (for evaluation scripts)."""
        records = [self._metadata_for(p) for p in prompts]  # fail before running the detector
        uint8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        detections = self.detector(uint8)
        if not (isinstance(detections, (list, tuple)) and len(detections) == len(prompts)):
            raise ValueError(
                f"reward {self.name!r}: the detector must return one dict per image "
                f"({len(prompts)}), got {str(detections)[:200]}"
            )
        verdicts = []
        for array, found, record in zip(uint8.numpy(), detections, records):
            objects = select_objects(found, record["tag"], self.thresholds)

            def colors(classname, objs, array=array):
                return list(self.color_classifier(array, classname, objs))

            verdicts.append(judge(objects, record, colors, self.thresholds.position_threshold))
        return verdicts

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        verdicts = self.verdicts(images, prompts)
        values = [float(getattr(v, self.score_kind)) for v in verdicts]
        return torch.tensor(values, dtype=torch.float32, device=images.device)
