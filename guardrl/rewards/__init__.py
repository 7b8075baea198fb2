"""Rewards: the interface and offline rewards."""

from guardrl.rewards.base import Reward
from guardrl.rewards.jpeg import JpegCompressibility, jpeg_size_kb

__all__ = ["JpegCompressibility", "Reward", "jpeg_size_kb"]
