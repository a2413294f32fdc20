"""One thread that runs every MLX call of a model: MLX is not thread-safe, and its arrays and
streams belong to the thread that made them. Other threads submit work and wait on a Future.

Between jobs the thread can run a `step` (the neurons' batch): while it reports more work, the
thread takes the jobs that have arrived and steps again, so new work joins at the next step.

Stopping it cleanly matters because of what a thread that used MLX leaves behind: its C++
thread-locals (mx.compile's cache among them) are destroyed after the Python thread has ended,
and their destructors take the GIL. If the interpreter is finalizing by then, taking the GIL ends
the thread inside a destructor and the process aborts ("terminate called without an active
exception"). So `close()` waits for the *native* thread to end, thread-locals and all, not only
for Python's join; and every thread still open at interpreter exit is closed by an atexit hook,
which runs before the interpreter starts finalizing.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import select
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future

JOIN_TIMEOUT_S = 60.0  # close() waits this long for the running job (a step, a load) to end


class MLXThreadClosed(RuntimeError):
    """Work was submitted to an MLX thread that was closed."""


class NativeEnd:
    """A pipe whose write end the thread's own pthread key destructor closes: those run after the
    thread's C++ thread-local destructors, so EOF on the read end means the native thread is
    done with everything that could take the GIL. Where libc cannot be reached this way, `wait`
    returns at once (Python's join is then all there is)."""

    _libc = None

    def __init__(self):
        self._read = self._write = None
        self._key = None
        libc = self._pthreads()
        if libc is None:
            return
        key = (ctypes.c_ulong if sys.platform == "darwin" else ctypes.c_uint)()
        if libc.pthread_key_create(ctypes.byref(key), ctypes.cast(libc.close, ctypes.c_void_p)) != 0:
            return
        self._key = key
        self._read, self._write = os.pipe()

    @classmethod
    def _pthreads(cls):
        if cls._libc is None and os.name == "posix":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.pthread_setspecific.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
                libc.pthread_key_delete.argtypes = [ctypes.c_ulong]
                ctypes.cast(libc.close, ctypes.c_void_p)  # the destructor must be there too
                cls._libc = libc
            except (OSError, AttributeError):
                cls._libc = False
        return cls._libc or None

    def on_thread(self) -> None:
        """Called first thing on the thread: hand it the write end to close when it is gone."""
        if self._write is None:
            return
        if self._libc.pthread_setspecific(self._key.value, ctypes.c_void_p(self._write)) != 0:
            os.close(self._write)  # no destructor will: the wait ends at once
        self._write = None

    def never_started(self) -> None:
        if self._write is not None:
            os.close(self._write)
            self._write = None

    def wait(self, timeout: float) -> bool:
        """True once the native thread has ended (or nothing can tell), False after `timeout`."""
        if self._read is None:
            return True
        ready, _, _ = select.select([self._read], [], [], timeout)
        if not ready:
            return False
        os.close(self._read)
        self._read = None
        self._libc.pthread_key_delete(self._key.value)  # its destructor has run: the key is free
        return True


class MLXThread:
    """A thread of MLX work. `step` runs between jobs while it has work; `on_close` (set by the
    owner) runs on the thread as its last job, so an engine can fail what it still holds."""

    def __init__(self, name: str = "conch-mlx"):
        self._jobs: queue.Queue = queue.Queue()
        self.step: Callable[[], bool] | None = None  # set on this thread; True while it has work
        self.on_close: Callable[[], None] | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._end = NativeEnd()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        try:
            self._thread.start()
        except BaseException:
            self._end.never_started()
            raise
        _open_threads.add(self)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        if self._closed:
            future.set_exception(MLXThreadClosed(f"{self._thread.name} is closed"))
            return future
        self._jobs.put((fn, args, future))
        return future

    def call(self, fn, *args):
        """Run fn(*args) on the MLX thread and return its result (or raise its exception) here."""
        return self.submit(fn, *args).result()

    def _run(self) -> None:
        self._end.on_thread()
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
                    self._fail_left(jobs)
                    return
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            busy = self.step() if self.step else False

    def _fail_left(self, jobs: list) -> None:
        """Jobs queued behind the stop (a submit racing close) fail rather than wait for ever."""
        left = jobs[[j[0] for j in jobs].index(None) + 1:]
        while True:
            try:
                left.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for _, _, future in left:
            future.set_exception(MLXThreadClosed(f"{self._thread.name} is closed"))

    def close(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Run `on_close`, stop the thread and wait until it has ended natively. Twice is harmless;
        from the thread itself it only asks the thread to stop."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _open_threads.discard(self)
        if self.on_close is not None:
            self._jobs.put((self.on_close, (), Future()))
        self._jobs.put((None, (), None))
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._end.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed


_open_threads: weakref.WeakSet[MLXThread] = weakref.WeakSet()


@atexit.register
def close_all() -> None:
    """Every MLX thread still open, closed before the interpreter finalizes (see the module's doc)."""
    for thread in list(_open_threads):
        thread.close()
