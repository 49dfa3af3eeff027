"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ending in NUL on fds 3 and 4), so a test can load a page, evaluate JavaScript in it and
take a screenshot without a WebSocket client. Every wait is bounded."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

SERVICES = Path(__file__).resolve().parent / "services"


def chromium_binary() -> str:
    """Debian's Chromium, installed by tests/services/chromium_up.sh when missing."""
    proc = subprocess.run([str(SERVICES / "chromium_up.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium_up.sh failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout.strip().splitlines()[-1]


class Chromium:
    """One headless browser with one page; a context manager that always ends the browser."""

    def __init__(self, binary: str, width: int = 1400, height: int = 2400):
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's ends, moved above fd 9 so that placing them on 3 and 4 cannot clobber each other.
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=_pipe_fds(child_r, child_w))  # only 3 and 4 are inheritable
        os.close(child_r)
        os.close(child_w)
        self._buffer, self._next_id, self.target, self.session = b"", 0, None, None

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.profile.cleanup()

    def send(self, method: str, params: dict | None = None, *, timeout: float = 30, page: bool = False) -> dict:
        """One command; returns its result (raises RuntimeError on an error reply or no reply)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"{method}: no reply from Chromium (exit status {self.proc.poll()})")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{method}: Chromium closed its pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> None:
        """A new page at `url`, in place of the previous one (closed: it stops polling its server)."""
        if self.target is not None:
            self.send("Target.closeTarget", {"targetId": self.target})
        self.target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"JavaScript failed: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, poll: float = 0.5):
        """Polls `expression` until it is truthy; returns its value, or raises after `timeout`."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"after {timeout:.0f} s the page still gives {value!r} for {expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def _pipe_fds(read_end: int, write_end: int):
    """In the child, before exec: the command pipe on fd 3 and the reply pipe on fd 4 (dup2 makes
    them inheritable; every other descriptor Python opened closes on exec)."""
    def setup():
        os.dup2(read_end, 3)
        os.dup2(write_end, 4)
    return setup
