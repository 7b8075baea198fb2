"""Non-finite values in a GRPO iteration: detection agreed across ranks, skip counters, the stop rule.

An update whose loss or gradient norm is non-finite on any rank is skipped on every rank (the collective keeps
the ranks in step); `faults.max_consecutive_nonfinite` skips in a row stop the run with advice. The counters
are part of the checkpoint (`state_dict`), so a resumed run keeps counting where it left off
(docs/reliability.md).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def nonfinite_on_any_rank(strategy, tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first non-finite tensor here, or a placeholder when only another rank has one; None
    when all ranks are clean. A collective (`strategy.reduce_boolean_decision`): every rank calls it at the
    same point."""
    local = next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if not strategy.reduce_boolean_decision(local is not None, all=False):
        return None
    return local or "value on another rank"


class SkippedUpdates:
    """Counts skipped updates and stops the run after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    def record(self, problem: Optional[str], iteration: int, announce: bool) -> None:
        """After an iteration: `problem` names what was non-finite, None when the update ran. `announce` on
        rank zero only."""
        if problem is None:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if announce:
            log.warning(
                "guardrl: iteration %d: non-finite %s; its update is skipped (%d in a row, %d in all; the "
                "run stops at faults.max_consecutive_nonfinite=%d in a row)",
                iteration,
                problem,
                self.in_a_row,
                self.total,
                self.limit,
            )

    def stop_if_too_many(self, problem: Optional[str], iteration: int) -> None:
        if problem is not None and self.in_a_row >= self.limit:
            raise RuntimeError(
                f"guardrl: {self.in_a_row} GRPO iterations in a row (the last: iteration {iteration}) "
                f"skipped their update because of a non-finite {problem}; stopping "
                f"(faults.max_consecutive_nonfinite={self.limit}). Resume from the last checkpoint with a "
                "lower learning rate, or check the reward for NaN/inf outputs."
            )

    # The checkpoint's names for the counters (kept from the format's first version).
    def state_dict(self) -> dict[str, Any]:
        return {"num_skipped_updates": self.total, "consecutive_skipped_updates": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state.get("num_skipped_updates", 0)
        self.in_a_row = state.get("consecutive_skipped_updates", 0)
