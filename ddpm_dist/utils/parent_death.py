"""Ranks that end with their launcher.

torchrun starts each worker in a session of its own, so a SIGKILL of torchrun (kill -9 of its
process group, the OOM killer) does not reach the ranks: they would go on training beside the
user's rerun in the same run folder. Linux's parent-death signal (prctl PR_SET_PDEATHSIG) has
the kernel kill a rank when its parent, the launcher, ends (strictly: when the thread that
started the rank ends; torchrun's agent starts its workers from its main thread). The launcher may already have died
between starting us and the prctl call; then we were handed to another parent (init or a
subreaper), which we notice because it is not a Python process, and we exit at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launched_by_torchrun(env: dict | None = None) -> bool:
    """torchrun's agent sets TORCHELASTIC_RUN_ID in every worker it starts."""
    return "TORCHELASTIC_RUN_ID" in (os.environ if env is None else env)


def _executable(pid: int | str) -> str | None:
    try:
        return os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def end_with_launcher() -> None:
    """Under torchrun on Linux: SIGKILL this process when torchrun dies. Elsewhere nothing (a
    process started from a shell must outlive a closed terminal under nohup)."""
    if not sys.platform.startswith("linux") or not launched_by_torchrun():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not allowed here (a seccomp profile): keep running as before
    parent = os.getppid()
    launcher = _executable(parent)
    # torchrun's agent is a Python process; init or a subreaper as the parent means it died already.
    if parent == 1 or (launcher is not None and not os.path.basename(launcher).startswith("python")):
        os._exit(1)
