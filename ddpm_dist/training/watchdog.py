"""Ends a training process that makes no progress, so a hung job frees its nodes.

The loop calls `beat()` after every step. If `timeout` seconds pass without one, the watchdog
thread writes every thread's stack to stderr (the job log: where it hung) and ends the process
with FAULT_EXIT_STATUS; launch/_train_job.sh requeues on it and the run resumes from its last
checkpoint. `os._exit` because a hung main thread never returns to run exit handlers.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

from ddpm_dist.utils.logs import log

FAULT_EXIT_STATUS = 6  # a rank hung or died: requeue and resume from the last checkpoint


class Watchdog:
    def __init__(self, timeout: float, what: str = "training step"):
        self.timeout, self.what = timeout, what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="ddpm-watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(10.0, self.timeout / 4)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                log.error(f"error: no {self.what} finished for {idle:.0f} s (train.hang_timeout="
                          f"{self.timeout:g}); stacks of every thread follow; exiting with status "
                          f"{FAULT_EXIT_STATUS} to be requeued")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(FAULT_EXIT_STATUS)
