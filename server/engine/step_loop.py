"""One thread that runs the steps of every engine in the process: one OpenMP team for all models.

Why: each thread that runs torch (or Hearth's native) parallel kernels keeps its own OpenMP team
alive until it exits, and libgomp cuts the spin-wait of every team once it manages more threads
than there are CPUs. With one engine thread per model, a second model, even idle, made the first
one's threads sleep on a futex between the ~100 parallel regions of a step (README, "Several
models"). Here all engines share one thread, so a server with several models keeps one team.

Design choices:
- The engines share this loop's Condition as their own lock: `generate()` and `abort()` notify
  it, and the thread wakes when any engine has something to do.
- Turns go round-robin: each pass steps every engine that has work once, in the order they
  started, so two busy models share the CPU step by step and an idle one costs nothing.
- The thread starts with the first engine and exits when the last one shuts down (its team
  with it); `run_in_fresh_thread` keeps loading off this thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

logger = logging.getLogger("hearth.engine")


class Steppable(Protocol):
    def has_turn(self) -> bool:
        """Whether there is anything to do (called with the loop's lock held)."""

    def take_turn(self) -> bool:
        """Take new requests and aborts and run one step; False once the engine is stopping."""

    def finish(self) -> None:
        """Fail what is left and mark the engine stopped (on the loop thread, after its last turn)."""


class StepLoop:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._engines: list[Steppable] = []  # guarded by lock
        self._thread: threading.Thread | None = None  # guarded by lock

    def add(self, engine: Steppable) -> None:
        with self.lock:
            self._engines.append(engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hearth-engines", daemon=True)
                self._thread.start()
            self.lock.notify_all()

    @property
    def thread(self) -> threading.Thread | None:
        with self.lock:
            return self._thread

    def _run(self) -> None:
        while True:
            with self.lock:
                while self._engines and not any(engine.has_turn() for engine in self._engines):
                    self.lock.wait()
                if not self._engines:
                    self._thread = None
                    return
                ready = [engine for engine in self._engines if engine.has_turn()]
            for engine in ready:
                if not engine.take_turn():
                    self._remove(engine)

    def _remove(self, engine: Steppable) -> None:
        with self.lock:
            self._engines.remove(engine)
        engine.finish()


SHARED = StepLoop()  # every Engine of the process steps on this loop's thread
