"""Calling a reward with bounded retries and an optional timeout; never a silent zero.

A reward that raises (a flaky server, an OOM in a scorer) is retried `max_attempts` times with a doubling
delay, then the run fails with `RewardError`, naming the reward, the attempts and the last error. A timeout
runs the call in a worker thread and stops waiting after `timeout_s`: Python cannot kill that thread, so a
call that hangs forever keeps its thread (daemon, it does not block the exit); a remote reward should also
bound its own requests.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Optional

import torch

from guardrl.rewards.base import Reward


class RewardError(RuntimeError):
    """A reward failed every allowed attempt."""


def score_with_retries(
    reward: Reward,
    images: torch.Tensor,
    prompts: list[str],
    max_attempts: int = 3,
    retry_delay_s: float = 1.0,
    timeout_s: Optional[float] = None,
    group_size: Optional[int] = None,
) -> torch.Tensor:
    errors: list[str] = []
    delay = retry_delay_s
    for attempt in range(1, max_attempts + 1):
        try:
            return _call(reward, images, prompts, timeout_s, group_size)
        except Exception as error:  # noqa: BLE001 - any failure of user/remote code is retried, then reported
            errors.append(f"attempt {attempt}: {type(error).__name__}: {error}")
            if attempt < max_attempts and delay > 0:
                time.sleep(delay)
                delay *= 2
    raise RewardError(
        f"reward {reward.name!r} failed {max_attempts} time(s) (faults.reward_max_attempts={max_attempts}, "
        f"faults.reward_timeout_s={timeout_s}); " + "; ".join(errors)
    )


def _call(
    reward: Reward,
    images: torch.Tensor,
    prompts: list[str],
    timeout_s: Optional[float],
    group_size: Optional[int] = None,
) -> torch.Tensor:
    if timeout_s is None:
        return reward(images, prompts, group_size)
    # A fresh single-use thread per call: a hung call must not block the next attempt.
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=f"reward-{reward.name}"
    )
    future = executor.submit(reward, images, prompts, group_size)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no result within {timeout_s} s") from None
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
