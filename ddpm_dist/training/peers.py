"""Naming the rank that went missing when a collective fails.

A failed collective says only that a connection closed or timed out, not whose. So every rank
publishes a heartbeat, `<counter> <host>`, to the rendezvous store (the TCPStore at
MASTER_ADDR:MASTER_PORT, on rank 0's node) every BEAT_S seconds from a thread with its own store
connection. After a failure, `lost_peers()` reads every rank's beat twice, WATCH_S apart: ranks
whose counter did not move are lost (killed, stopped, or behind a dead network); the survivors
are all still in this same diagnosis then, so their beats move. A store that does not answer
means rank 0's node itself is lost.

Where a collective may legitimately wait long (start-up, checkpoint writes, sample grids: the
long train.collective_timeout), a silent node would hold the survivors for that long. There the
beats are watched instead (`watch`): rank 0 reads every rank's beat at each of its own; a rank
whose counter has not moved for the watch limit is lost, and rank 0 names it in the store
(LOST_KEY) for the others and ends itself. Every rank reads that key at each beat and ends with
the same line; a rank that cannot reach the store for the limit ends too (rank 0's node is lost).
They exit with status 6 (`os._exit`: the main thread is blocked inside a collective), which the
launchers requeue. A rank that finished writes DONE, so it is not taken for lost.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time

import torch.distributed as dist

from ddpm_dist.training.watchdog import FAULT_EXIT_STATUS
from ddpm_dist.utils.logs import log

BEAT_S = 2.0    # between a rank's heartbeats
WATCH_S = 6.0   # how long a diagnosis watches the beats: a live rank beats at least twice
STORE_TIMEOUT_S = 5.0
LOST_KEY = "ddpm/heartbeat/lost"
DONE = "done"


def _key(rank: int) -> str:
    return f"ddpm/heartbeat/{rank}"


class Heartbeat:
    """Started after the process group exists (its store is up); a daemon thread until close()."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.addr, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._store = self._connect()
        self._beats = 0
        self._watch: tuple[float, str] | None = None  # (limit s, what the ranks are doing)
        self._moved: dict[int, tuple[str, float]] = {}  # rank -> (counter, when it last changed)
        self._reached = time.monotonic()  # when the store last answered
        self._beat()  # the first beat before training starts: every rank has one to compare
        self._thread = threading.Thread(target=self._run, name="ddpm-heartbeat", daemon=True)
        self._thread.start()

    def _connect(self) -> dist.TCPStore:
        return dist.TCPStore(self.addr, self.port, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))

    def _beat(self) -> None:
        self._beats += 1
        self._store.set(_key(self.rank), f"{self._beats} {self.host}")

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            watch = self._watch
            try:
                self._beat()
                if self._store.check([LOST_KEY]):
                    self._end(self._store.get(LOST_KEY).decode())
                self._reached = time.monotonic()
                if watch and self.rank == 0:
                    self._check_beats(*watch)
            except Exception:  # the store's node is gone: lost_peers() reports it
                if watch and time.monotonic() - self._reached > watch[0]:
                    self._end(f"the rendezvous store on {self.addr}:{self.port} (rank 0's node) has not answered "
                              f"for {watch[0]:g} s while {watch[1]}: that node is lost or cut off")

    def watch(self, limit_s: float | None, what: str = "") -> None:
        """From now on (None: no longer) a rank silent for `limit_s` seconds ends every rank."""
        now = time.monotonic()
        self._moved = {r: (count, now) for r, (count, _) in self._moved.items()}  # a fresh limit for each
        self._reached = now
        self._watch = (limit_s, what) if limit_s else None

    def _check_beats(self, limit_s: float, what: str) -> None:
        now = time.monotonic()
        for r, (count, host) in self._read_all(self._store).items():
            if count == DONE:
                continue
            if self._moved.get(r, (None,))[0] != count:
                self._moved[r] = (count, now)
            elif now - self._moved[r][1] > limit_s:
                self._store.set(LOST_KEY, f"lost rank {r} on {host} (no heartbeat for {limit_s:g} s while {what})")
                time.sleep(2 * BEAT_S)  # the store lives in this process: let the others read the key
                self._end(self._store.get(LOST_KEY).decode())

    def _end(self, why: str) -> None:
        log.error(f"error: another rank died or hung: {why}; exiting with status {FAULT_EXIT_STATUS} to resume "
                  f"from the last checkpoint")
        os._exit(FAULT_EXIT_STATUS)

    def close(self) -> None:
        """No more beats; the others no longer wait for this rank's."""
        self._stop.set()
        self._thread.join(timeout=STORE_TIMEOUT_S + BEAT_S)
        try:
            self._store.set(_key(self.rank), f"{DONE} {self.host}")
        except Exception:  # the store is gone: nobody is left to watch
            pass

    def _read_all(self, store: dist.TCPStore) -> dict[int, tuple[str, str]]:
        """rank -> (counter, host) of every other rank; ('0', '?') for one that never beat."""
        beats = {}
        for r in range(self.world_size):
            if r != self.rank:
                value = store.get(_key(r)).decode() if store.check([_key(r)]) else "0 ?"
                count, _, host = value.partition(" ")
                beats[r] = (count, host)
        return beats

    def lost_peers(self) -> str:
        """What this rank can tell about who is gone, as a phrase for one error line."""
        try:
            store = self._connect()  # the thread's connection may be the one that broke
            before = self._read_all(store)
            time.sleep(WATCH_S)
            after = self._read_all(store)
        except Exception:
            return (f"the rendezvous store on {self.addr}:{self.port} (rank 0's node) does not answer: "
                    f"that node is lost or cut off")
        lost = [f"rank {r} on {host}" for r, (count, host) in sorted(after.items()) if before[r][0] == count]
        if not lost:
            return "every other rank still beats (its log says why)"
        return f"lost {', '.join(lost)} (its heartbeat stopped)"
