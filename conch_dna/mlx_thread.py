"""One thread that runs every MLX call of a model: MLX is not thread-safe, and its arrays and
streams belong to the thread that made them. Other threads submit work and wait on a Future.

Between jobs the thread can run a `step` (the neurons' batch): while it reports more work, the
thread takes the jobs that have arrived and steps again, so new work joins at the next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future


class MLXThread:
    def __init__(self, name: str = "conch-mlx"):
        self._jobs: queue.Queue = queue.Queue()
        self.step: Callable[[], bool] | None = None  # set on this thread; True while it has work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((fn, args, future))
        return future

    def call(self, fn, *args):
        """Run fn(*args) on the MLX thread and return its result (or raise its exception) here."""
        return self.submit(fn, *args).result()

    def _run(self) -> None:
        busy = False
        while True:
            jobs = [] if busy else [self._jobs.get()]
            while True:  # every job that has arrived runs before the next step
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for fn, args, future in jobs:
                if fn is None:
                    return
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            busy = self.step() if self.step else False

    def close(self) -> None:
        self._jobs.put((None, (), None))
