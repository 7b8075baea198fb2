"""Rewards: the interface, offline rewards, how they are called (retries, timeouts), and served ones."""

from guardrl.rewards.aesthetic import LaionAesthetic
from guardrl.rewards.base import Reward
from guardrl.rewards.calling import RewardError, score_with_retries
from guardrl.rewards.clip_rewards import CLIPScore, PickScore
from guardrl.rewards.faults import FaultInjectionReward
from guardrl.rewards.geneval import ClipColorClassifier, GenEval, Mask2FormerDetector
from guardrl.rewards.group import GroupRank, GroupReward, PairwiseFromScores, PairwiseReward
from guardrl.rewards.hps import HPSv21
from guardrl.rewards.image_reward import ImageReward
from guardrl.rewards.jpeg import JpegCompressibility, jpeg_size_kb
from guardrl.rewards.ocr import OcrReward, Recognizer, TrOCRRecognizer
from guardrl.rewards.remote import RemoteReward
from guardrl.rewards.vlm_judge import VLMJudgeReward

__all__ = [
    "FaultInjectionReward",
    "JpegCompressibility",
    "RemoteReward",
    "Reward",
    "RewardError",
    "jpeg_size_kb",
    "score_with_retries",
]
__all__ += [
    "CLIPScore",
    "HPSv21",
    "LaionAesthetic",
    "OcrReward",
    "PickScore",
    "Recognizer",
    "TrOCRRecognizer",
]
__all__ += ["ClipColorClassifier", "GenEval", "Mask2FormerDetector"]
__all__ += ["ImageReward"]
__all__ += ["VLMJudgeReward"]
__all__ += ["GroupRank", "GroupReward", "PairwiseFromScores", "PairwiseReward"]
