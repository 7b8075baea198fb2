"""ImageGridCallback: the iteration's samples in the run's loggers, a row per prompt group, with rewards.

    images/groups            one image: a row per prompt group (at most max_groups), a column per sample,
                             each sample's proxy reward written under it; rows in the batch's order
    images/groups_captions   markdown: each row's prompt and rewards (prompts are too long to draw)

Both at step = the GRPO iteration (the x axis of every guardrl log), on iterations 0, n, 2n, ... and the
last one. Rank zero only, from its own samples (groups never span ranks). No torchvision: the grid is
built with torch ops and the text drawn with PIL.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image, ImageDraw, ImageFont

from guardrl.logger_media import log_image, log_text

PAD = 2  # pixels between cells and around the grid
LABEL_HEIGHT = 14  # the strip under each sample that holds its reward
MIN_CELL = (
    96  # small images (the tiny model's 32 px) are enlarged so that the label fits and they can be seen
)


def grid_layout(image_size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int]:
    """(scale, grid height, grid width) of `make_grid` for images of (H, W) on rows x cols cells."""
    height, width = image_size
    scale = max(1, -(-MIN_CELL // max(height, width)))  # integer upscaling: pixels stay sharp squares
    cell_h, cell_w = height * scale + LABEL_HEIGHT, width * scale
    return scale, PAD + rows * (cell_h + PAD), PAD + cols * (cell_w + PAD)


def make_grid(images: torch.Tensor, rewards: torch.Tensor, group_size: int, max_groups: int) -> torch.Tensor:
    """(3, H_grid, W_grid) float in [0, 1]: the first `max_groups` groups of `group_size` consecutive
    samples, one group per row, each sample enlarged (nearest) with its reward written below it."""
    images = images.detach().float().cpu().clamp(0, 1)
    rewards = rewards.detach().float().cpu().reshape(-1)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] != rewards.numel() or images.shape[0] % group_size:
        raise ValueError(
            f"{images.shape[0]} images and {rewards.numel()} rewards do not make whole groups of {group_size}"
        )
    rows = min(images.shape[0] // group_size, max_groups)
    height, width = images.shape[-2:]
    scale, grid_h, grid_w = grid_layout((height, width), rows, group_size)
    cells = F.interpolate(images[: rows * group_size], scale_factor=scale, mode="nearest")
    grid = torch.ones(3, grid_h, grid_w)  # white background: padding and label strips
    cell_h, cell_w = height * scale + LABEL_HEIGHT, width * scale
    for i in range(rows * group_size):
        top, left = PAD + (i // group_size) * (cell_h + PAD), PAD + (i % group_size) * (cell_w + PAD)
        grid[:, top : top + height * scale, left : left + cell_w] = cells[i]
    return _draw_rewards(grid, rewards[: rows * group_size], group_size, (height * scale, cell_h, cell_w))


def _draw_rewards(grid: torch.Tensor, rewards: torch.Tensor, group_size: int, sizes) -> torch.Tensor:
    image_h, cell_h, cell_w = sizes
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i, reward in enumerate(rewards.tolist()):
        top, left = PAD + (i // group_size) * (cell_h + PAD), PAD + (i % group_size) * (cell_w + PAD)
        draw.text((left + 2, top + image_h + 1), f"{reward:.4g}", fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255


def captions(prompts: list[str], rewards: torch.Tensor, group_size: int, max_groups: int) -> str:
    """Markdown table: row, prompt, the group's rewards (same order as the grid)."""
    rewards = rewards.detach().float().cpu().reshape(-1)
    lines = ["| row | prompt | rewards |", "|---|---|---|"]
    for row in range(min(len(prompts) // group_size, max_groups)):
        prompt = prompts[row * group_size].replace("|", "\\|")
        values = ", ".join(f"{r:.4g}" for r in rewards[row * group_size : (row + 1) * group_size].tolist())
        lines.append(f"| {row} | {prompt} | {values} |")
    return "\n".join(lines)


class ImageGridCallback(Callback):
    def __init__(self, every_n_iterations: int = 10, max_groups: int = 4) -> None:
        """
        Args:
            every_n_iterations: write the grid on GRPO iterations 0, n, 2n, ... and on the last one.
            max_groups: at most this many prompt groups (rows) per grid.
        """
        for name, value in (("every_n_iterations", every_n_iterations), ("max_groups", max_groups)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"image_grid.{name} must be an integer >= 1, got {value!r}")
        self.every_n_iterations = every_n_iterations
        self.max_groups = max_groups

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if not trainer.is_global_zero or not isinstance(outputs, dict) or "images" not in outputs:
            return
        iteration = pl_module.num_iterations - 1  # the iteration just finished
        if iteration % self.every_n_iterations and not trainer.should_stop:
            return
        if not trainer.loggers:
            return
        group_size = pl_module.group_size
        grid = make_grid(outputs["images"], outputs["rewards"], group_size, self.max_groups)
        text = captions(list(outputs["prompts"]), outputs["rewards"], group_size, self.max_groups)
        # TensorBoard, W&B, MLflow, CSV; other loggers are warned about once (guardrl/logger_media.py).
        log_image(trainer, "images/groups", grid, iteration)
        log_text(trainer, "images/groups_captions", text, iteration)
