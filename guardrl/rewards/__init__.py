"""Rewards: the interface, offline rewards, and how they are called (retries, timeouts)."""

from guardrl.rewards.base import Reward
from guardrl.rewards.calling import RewardError, score_with_retries
from guardrl.rewards.faults import FaultInjectionReward
from guardrl.rewards.jpeg import JpegCompressibility, jpeg_size_kb

__all__ = [
    "FaultInjectionReward", "JpegCompressibility", "Reward", "RewardError", "jpeg_size_kb", "score_with_retries",
]
