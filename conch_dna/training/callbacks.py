"""KDCallback: what the distillation engine tells the layer above, and asks it.

The engine prints nothing. A command line draws a progress bar from these hooks, the daemon's
worker writes them as JSON lines, a test records them. Every hook does nothing by default.
"""

from __future__ import annotations


class KDCallback:
    def on_stage(self, domain: str, text: str) -> None:
        """A stage of a run in words: teacher targets, resuming, the held-out result, the adapter."""

    def on_train_start(self, domain: str, num_iters: int, start: int) -> None:
        """Training of `domain` begins at step `start` (0, or a resumed checkpoint's) of num_iters."""

    def on_train_report(self, report: dict) -> None:
        """Every steps_per_report: iteration, combined, kd, ce (means since the last one), tokens_per_second."""

    def should_stop(self) -> bool:
        """Asked between steps and between teacher passes: True stops the run at a checkpoint."""
        return False
