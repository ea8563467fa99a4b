"""A wall-clock budget for a training stage: `--max-minutes N` ends the run in time and keeps what it learned.

When N minutes of training have passed (counted from the first step, so model building and data loading are not
charged), the step in progress finishes, a checkpoint is saved (a later `--resume auto` continues from it) and the
stage then writes its final model as usual. The learning-rate schedule still follows `--max-steps`: choose it so the
run would end near the budget, and let the budget only guard against a slower machine than expected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TimeBudgetCallback(TrainerCallback):
    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        if minutes <= 0:
            raise ValueError(f"--max-minutes={minutes!r} must be > 0 (leave it unset for no limit)")
        self.seconds, self.clock = 60.0 * minutes, clock
        self.start: float | None = None
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = self.clock() - self.start
        if elapsed >= self.seconds and state.global_step < state.max_steps:
            control.should_training_stop = True
            control.should_save = True
            self.stopped_at_step = state.global_step
            logger.warning("time budget of %.1f min reached after %d of %d steps (%.0f s): saving and stopping",
                           self.seconds / 60, state.global_step, state.max_steps, elapsed)
        return control
