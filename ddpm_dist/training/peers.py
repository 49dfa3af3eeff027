"""Naming the rank that went missing when a collective fails.

A failed collective says only that a connection closed or timed out, not whose. So every rank
publishes a heartbeat, `<counter> <host>`, to the rendezvous store (the TCPStore at
MASTER_ADDR:MASTER_PORT, on rank 0's node) every BEAT_S seconds from a thread with its own store
connection. After a failure, `lost_peers()` reads every rank's beat twice, WATCH_S apart: ranks
whose counter did not move are lost (killed, stopped, or behind a dead network); the survivors
are all still in this same diagnosis then, so their beats move. A store that does not answer
means rank 0's node itself is lost.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time

import torch.distributed as dist

BEAT_S = 2.0    # between a rank's heartbeats
WATCH_S = 6.0   # how long a diagnosis watches the beats: a live rank beats at least twice
STORE_TIMEOUT_S = 5.0


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
            try:
                self._beat()
            except Exception:  # the store's node is gone: lost_peers() reports it
                return

    def close(self) -> None:
        self._stop.set()

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
