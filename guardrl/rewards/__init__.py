"""Rewards: the interface, offline rewards, how they are called (retries, timeouts), and served ones."""

from guardrl.rewards.base import Reward
from guardrl.rewards.calling import RewardError, score_with_retries
from guardrl.rewards.faults import FaultInjectionReward
from guardrl.rewards.jpeg import JpegCompressibility, jpeg_size_kb
from guardrl.rewards.remote import RemoteReward

__all__ = [
    "FaultInjectionReward", "JpegCompressibility", "RemoteReward", "Reward", "RewardError", "jpeg_size_kb", "score_with_retries",
]
