"""RemoteReward: a reward served over HTTP by `python -m guardrl.rewards.server`, used like a local one,
and the typed, pickle-free payload both sides share (see guardrl/rewards/server.py for the wire format)."""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import time
from typing import Any, Optional

import numpy as np
import torch

from guardrl.rewards.base import Reward
from guardrl.rewards.calling import RewardError

# ---------------------------------------------------------------- the payload (both sides)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, the quantisation a PNG would apply."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


def encode_images(images: torch.Tensor, image_format: str = "raw") -> dict[str, Any]:
    array = images_to_uint8(images)
    if image_format == "raw":
        return {
            "format": "raw",
            "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode(),
        }
    if image_format == "png":
        from PIL import Image

        encoded = []
        for image in array:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        return {"format": "png", "data": encoded}
    raise ValueError(f"RemoteReward.image_format={image_format!r}: must be 'raw' or 'png'")


# 4096 x 4096: far above any published recipe's resolution (SD3.5 / Flux at 512-1024 px); a decompression bomb
# (a tiny PNG that claims 20000 x 20000 pixels) is refused before a pixel is decoded.
DEFAULT_MAX_PIXELS = 4096 * 4096


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImagesTooLarge(ValueError):
    """An image with more pixels than the server accepts (HTTP 413)."""


def decode_images(payload: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The inverse of encode_images, validating everything; returns (B, 3, H, W) float in [0, 1]. Raises
    ValueError for anything malformed (bad base64, not a PNG, a truncated PNG) and ImagesTooLarge for an image
    of more than `max_pixels` pixels, so that a server answers 4xx, never 500."""
    if not isinstance(payload, dict) or payload.get("format") not in ("raw", "png"):
        raise ValueError("'images' must be an object with 'format' 'raw' or 'png'")
    if payload["format"] == "raw":
        shape = payload.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 4
            and shape[3] == 3
            and all(isinstance(n, int) and n > 0 for n in shape)
        ):
            raise ValueError(f"'images.shape' must be [B, H, W, 3] of positive integers, got {shape!r}")
        _check_pixels(shape[2], shape[1], max_pixels)
        data = base64.b64decode(payload.get("data", ""), validate=True)
        if len(data) != math.prod(shape):
            raise ValueError(f"'images.data' holds {len(data)} bytes, shape {shape} needs {math.prod(shape)}")
        array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    else:
        items = payload.get("data")
        if not isinstance(items, list) or not items:
            raise ValueError("'images.data' must be a non-empty list of base64 PNGs")
        arrays = [_decode_png(item, i, max_pixels) for i, item in enumerate(items)]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"'images.data' PNGs differ in size ({sorted({a.shape[:2] for a in arrays})}); "
                "a batch needs one size"
            )
        array = np.stack(arrays)
    return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / 255.0


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImagesTooLarge(
            f"an image of {width} x {height} pixels is larger than this server accepts "
            f"({max_pixels} pixels, --max-pixels)"
        )


def _decode_png(item: Any, index: int, max_pixels: int) -> np.ndarray:
    from PIL import Image

    if not isinstance(item, str):
        raise ValueError(f"'images.data[{index}]' must be a base64 string, got {type(item).__name__}")
    try:
        data = base64.b64decode(item, validate=True)
        if data[:8] == _PNG_SIGNATURE and len(data) >= 24:
            # The IHDR chunk's size, before PIL opens anything (its own bomb check raises only above 2x its
            # limit).
            _check_pixels(*struct.unpack(">II", data[16:24]), max_pixels)
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image.width, image.height, max_pixels)
            return np.asarray(image.convert("RGB"))
    except ImagesTooLarge:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # UnidentifiedImageError (not an image), OSError (truncated), binascii.Error (bad base64: a
        # ValueError)
        raise ValueError(
            f"'images.data[{index}]' is not a readable PNG ({type(error).__name__}: {error})"
        ) from None


# ---------------------------------------------------------------- the client


class RemoteReward(Reward):
    """A reward served by `python -m guardrl.rewards.server`, used like a local one.

    Every request is bounded (`timeout_s`) and retried (`max_attempts`, doubling `retry_delay_s`); then the
    run fails with RewardError naming the URL and each attempt's error. A malformed response (not JSON, no
    `scores`, the wrong count, a non-number) is an error too, never a zero.
    """

    def __init__(
        self,
        url: str,
        token_env: Optional[str] = None,
        timeout_s: float = 60.0,
        max_attempts: int = 3,
        retry_delay_s: float = 1.0,
        image_format: str = "raw",
        weight: float = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(weight=weight, name=name or "remote")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward.url={url!r}: must start with http:// or https://")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"RemoteReward.timeout_s must be a finite number > 0, got {timeout_s!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"RemoteReward.max_attempts must be an integer >= 1, got {max_attempts!r}")
        encode_images(torch.zeros(1, 3, 1, 1), image_format)  # validates image_format
        self.url = url.rstrip("/")
        self.token = os.environ.get(token_env) if token_env else None
        if token_env and not self.token:
            raise ValueError(
                f"RemoteReward.token_env={token_env!r}: that environment variable is not set or empty"
            )
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.image_format = image_format

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import requests

        body = {"prompts": list(prompts), "images": encode_images(images, self.image_format)}
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        errors, delay = [], self.retry_delay_s
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = requests.post(
                    f"{self.url}/predict", json=body, headers=headers, timeout=self.timeout_s
                )
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    # The request itself is wrong: retrying cannot help.
                    raise RewardError(
                        f"reward server {self.url} refused the request ({response.status_code}): "
                        f"{response.text[:300]}"
                    )
                if response.status_code >= 400:  # a server error (5xx): retried; its body says what happened
                    raise RuntimeError(
                        f"HTTP {response.status_code} from {self.url}/predict: {response.text[:300]}"
                    )
                return _parse_scores(response, len(prompts), self.url).to(images.device)
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001 - connection refused, timeout, 5xx, malformed: retried, then reported
                errors.append(f"attempt {attempt}: {type(e).__name__}: {e}")
                if attempt < self.max_attempts:
                    time.sleep(delay)
                    delay *= 2
        raise RewardError(
            f"reward server {self.url} failed {self.max_attempts} time(s) "
            f"(RemoteReward.max_attempts={self.max_attempts}, timeout_s={self.timeout_s}); "
            + "; ".join(errors)
        )


def _parse_scores(response, expected: int, url: str) -> torch.Tensor:
    try:
        payload = response.json()
    except ValueError:
        raise ValueError(f"the response of {url} is not JSON: {response.text[:200]!r}") from None
    scores = payload.get("scores") if isinstance(payload, dict) else None
    if not isinstance(scores, list) or len(scores) != expected:
        raise ValueError(
            f"the response of {url} must hold 'scores', a list of {expected} numbers; got "
            f"{str(payload)[:200]!r}"
        )
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError(f"the response of {url} has non-numeric scores: {scores[:5]!r}")
    return torch.tensor(scores, dtype=torch.float32)
