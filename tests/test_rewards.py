"""Rewards: the interface's checks and JPEG compressibility's numbers."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from guardrl.rewards import JpegCompressibility, Reward


def test_jpeg_reward_is_minus_the_jpeg_size_in_kb():
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64, generator=generator)])
    rewards = JpegCompressibility(quality=90)(images, ["flat", "noise"])
    for image, reward in zip(images, rewards):
        array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=90)
        assert float(reward) == pytest.approx(-buffer.tell() / 1000.0)
    # a flat grey image compresses far better than uniform noise
    assert rewards[0] > rewards[1] + 1.0


def test_reward_interface_checks_shapes():
    class Broken(Reward):
        def score(self, images, prompts):
            return torch.zeros(len(prompts), 2)

    with pytest.raises(ValueError, match=r"reward 'broken' returned shape \(2, 2\), expected \(2,\)"):
        Broken()(torch.zeros(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="expected images of shape"):
        JpegCompressibility()(torch.zeros(2, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        JpegCompressibility()(torch.zeros(2, 3, 8, 8), ["a"])


def test_jpeg_quality_is_validated():
    with pytest.raises(ValueError, match=r"quality .*must be an integer in \[1, 95\]"):
        JpegCompressibility(quality=100)
