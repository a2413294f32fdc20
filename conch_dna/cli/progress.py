"""A distillation run on a terminal: stages as lines, training as a rich progress bar."""

from __future__ import annotations

from conch_dna.training.callbacks import KDCallback

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn


class RichProgress(KDCallback):
    """Draws the engine's callbacks on `console`."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Progress | None = None
        self.task = None
        self.domain = ""

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
