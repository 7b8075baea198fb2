"""The toy proxy's network and its weights files: `ProxyNet` (image -> per-pixel color and shape logits,
counts and centre bins of every (color, shape) combination), its `ProxyConfig`, and proxy.safetensors +
proxy.json (written atomically, loaded frozen). What the network predicts and why: guardrl/toy/proxy.py's
docstring and docs/toy_proxy.md."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from guardrl.toy.files import save_safetensors_atomic, write_json_atomic
from guardrl.toy.model import count_parameters
from guardrl.toy.world import COLORS, DEFAULT_IMAGE_SIZE, MAX_COUNT, SHAPES

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_FILE, CONFIG_FILE = "proxy.safetensors", "proxy.json"
OPTION = "model.rewards[...].init_args"
COMBINATIONS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
NUM_COUNTS = MAX_COUNT + 1  # count classes 0..MAX_COUNT, for a combination and for the total


def combination_index(color: str, shape: str) -> int:
    """Index into COMBINATIONS (colors major, shapes minor)."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass(frozen=True)
class ProxyConfig:
    image_size: int = DEFAULT_IMAGE_SIZE
    width: int = 32  # shape-branch channels at full resolution (twice that at 1/2 and 1/4)
    counter_width: int = 16  # counter channels at 1/2 resolution (x2 and x4 further down)
    counter_hidden: int = 64
    # Renders put related objects' centres >= 11 px apart along the relation's axis and at most half that
    # across it, so 2 px bins keep "along > across" true after binning.
    bin_size: int = 2

    @property
    def num_bins(self) -> int:
        return self.image_size // self.bin_size


class ProxyNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> dict of logits (see `forward`)."""

    def __init__(self, config: ProxyConfig = ProxyConfig()) -> None:
        super().__init__()
        self.config = config
        w, cw, size = config.width, config.counter_width, config.image_size
        # Color is a property of one pixel: a per-pixel MLP on RGB.
        self.color_head = nn.Sequential(nn.Conv2d(3, w, 1), nn.ReLU(), nn.Conv2d(w, 1 + len(COLORS), 1))
        # Shape sees a color-blind image (the brightest channel: 1 on any object, 0 on the background). No
        # training prompt has a blue circle (a held-out pairing): a shape branch that saw colors could learn
        # "blue is never round" and fail on held-out prompts; one that cannot see colors cannot learn that.
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU())
        # Down to 1/4 resolution: a 25 px receptive field covers a whole 12 px object from any of its pixels,
        # which a pixel needs in order to tell which shape it belongs to.
        self.down = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
        )
        self.coarse = nn.Conv2d(2 * w, 16, 1)
        self.shape_head = nn.Sequential(nn.Conv2d(w + 16, w, 1), nn.ReLU(), nn.Conv2d(w, 1 + len(SHAPES), 1))
        # The counter reads one soft mask at a time and never learns which combination it is.
        self.counter = nn.Sequential(
            nn.Conv2d(1, cw, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(cw, 2 * cw, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * cw, 4 * cw, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * cw * (size // 8) ** 2, config.counter_hidden),
            nn.ReLU(),
            nn.Linear(config.counter_hidden, NUM_COUNTS),
        )
        # Centres from a mask's column and row sums: finding the middle of a bump is a local, translation-
        # equivariant job for a 1-d convolution; the last layer pools pixels into bins.
        self.centre = nn.Sequential(
            nn.Conv1d(1, cw, 7, padding=3),
            nn.ReLU(),
            nn.Conv1d(cw, cw, 7, padding=6, dilation=2),
            nn.ReLU(),
            nn.Conv1d(cw, 1, config.bin_size, stride=config.bin_size),
        )

    def forward(self, images: torch.Tensor, select: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """color_logits (B, 8, H, W), shape_logits (B, 4, H, W), total_logits (B, 4), and per combination
        count_logits (B, K, 4) and x_logits / y_logits (B, K, num_bins): for all K = 21 COMBINATIONS, or with
        `select` (B, K) for those combination indices only (a reward needs two per image: far cheaper)."""
        B, _, H, W = images.shape
        color_logits = self.color_head(images - 0.5)
        fine = self.stem(images.amax(1, keepdim=True) - 0.5)
        coarse = self.coarse(self.down(fine))
        coarse = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
        shape_logits = self.shape_head(torch.cat([fine, coarse], dim=1))
        color_p, shape_p = color_logits.softmax(1)[:, 1:], shape_logits.softmax(1)[:, 1:]  # objects only
        if select is None:  # (B, 7, 3, H, W) -> (B, 21, H, W), COMBINATIONS order
            combo_maps = (color_p[:, :, None] * shape_p[:, None, :]).flatten(1, 2)
        else:

            def pick(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                return probs.gather(1, index[..., None, None].expand(-1, -1, H, W))

            combo_maps = pick(color_p, select // len(SHAPES)) * pick(shape_p, select % len(SHAPES))
        if self.training:
            # The counter and centre heads learn on the pixel heads' current maps but do not train them: the
            # pixel heads have exact per-pixel targets of their own (an end-to-end prototype learned them far
            # more slowly). At scoring time gradients flow through to the pixels, as `hack` needs.
            combo_maps, color_p = combo_maps.detach(), color_p.detach()
        K = combo_maps.shape[1]
        maps = torch.cat([combo_maps, color_p.sum(1, keepdim=True)], dim=1)  # + "any object", for the total
        counts = self.counter(maps.reshape(B * (K + 1), 1, H, W)).view(B, K + 1, NUM_COUNTS)
        profiles = torch.cat([combo_maps.sum(2), combo_maps.sum(3)], dim=1) / H  # (B, 2K, W): x, then y
        centres = self.centre(profiles.reshape(B * 2 * K, 1, W)).view(B, 2, K, -1)
        return {
            "color_logits": color_logits,
            "shape_logits": shape_logits,
            "count_logits": counts[:, :K],
            "total_logits": counts[:, K],
            "x_logits": centres[:, 0],
            "y_logits": centres[:, 1],
        }


def write_record(directory: str, record: dict) -> str:
    """CONFIG_FILE, atomically (a reader never sees half a file)."""
    return write_json_atomic(os.path.join(directory, CONFIG_FILE), record)


def read_record(directory: str | None) -> dict:
    with open(os.path.join(directory or WEIGHTS_DIR, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def save_proxy(directory: str, net: ProxyNet, record: dict) -> str:
    """WEIGHTS_FILE (float32: about 1 MB, and scores are bit-identical after loading) and CONFIG_FILE (config,
    parameter count, `record`), each atomically. Returns the weights path."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    path = save_safetensors_atomic(os.path.join(directory, WEIGHTS_FILE), tensors)
    write_record(directory, {"config": asdict(net.config), "parameters": count_parameters(net), **record})
    return path


def load_proxy(directory: str | None = None, option: str = f"{OPTION}.weights_path") -> tuple[ProxyNet, dict]:
    """(net, its json record) from a directory written by `train` (None: the shipped weights); the net is in
    eval mode and frozen."""
    from safetensors.torch import load_file

    where = directory or WEIGHTS_DIR
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not os.path.isfile(os.path.join(where, name)):
            raise FileNotFoundError(
                f"{option}={directory!r} has no {name}: it must be a directory written by "
                "`python -m guardrl.toy.proxy train --out DIR` (holding proxy.safetensors and proxy.json), "
                "or None for the shipped weights"
            )
    record = read_record(where)
    net = ProxyNet(ProxyConfig(**record["config"]))
    net.load_state_dict(load_file(os.path.join(where, WEIGHTS_FILE)), strict=True)
    net.eval().requires_grad_(False)
    return net, record
