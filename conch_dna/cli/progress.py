"""A distillation run on a terminal: stages as lines, training as a rich progress bar."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from conch_dna.training.callbacks import KDCallback

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn


class RichProgress(KDCallback):
    """Draws the engine's callbacks on `console`; inside `stop_on_signals()`, Ctrl-C or SIGTERM asks the
    run to stop at its next step (a checkpoint is kept, the run is recorded as interrupted)."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Progress | None = None
        self.task = None
        self.domain = ""
        self.stopping = threading.Event()

    def should_stop(self) -> bool:
        return self.stopping.is_set()

    @contextmanager
    def stop_on_signals(self):
        """SIGINT and SIGTERM only set a flag while the run goes (the engine checks it between steps);
        the handlers before are back afterwards."""
        def stop(signum, frame) -> None:
            if not self.stopping.is_set():
                self.console.print("stopping at the next step; its checkpoint is kept for the next run")
            self.stopping.set()

        before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    def on_stage(self, domain: str, text: str) -> None:
        self._close_bar()
        self.console.print(f"[bold]{domain}[/bold]: {text}" if domain else text)

    def on_train_start(self, domain: str, num_iters: int, start: int) -> None:
        self._close_bar()
        self.domain = domain
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar = Progress(*columns, console=self.console, transient=False)
        self.bar.start()
        self.task = self.bar.add_task(f"{domain} KD", total=num_iters, completed=start)

    def on_train_report(self, report: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=report["iteration"],
                            description=f"{self.domain} KD loss {report['combined']:.3f} "
                                        f"(kd {report['kd']:.3f} ce {report['ce']:.3f})")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
