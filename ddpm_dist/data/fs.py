"""Reading and writing shard files through fsspec: local paths or s3:// URLs, with retries.

S3 settings come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
or an explicit endpoint from the config. Credentials are never put into messages: every error
we raise names the URL and the kind of failure only, and is scrubbed of the key values.

Two failure policies:
- `check=True` (opening index.json at start-up): errors that retrying cannot fix (missing
  bucket or object, bad credentials, an endpoint host that does not resolve) are reported at
  once as one `DataConfigError` line; a refused connection is retried STARTUP_CONNECT_RETRIES
  times (a restarting server), then reported as a `DataConfigError` (most often a wrong
  endpoint); other errors (timeouts, server errors) are retried like mid-stream reads.
- mid-stream reads: every error is treated as transient (a restarting server answers with
  refused connections or missing buckets for a few seconds) and retried with exponential
  backoff. After the last retry an object that is still not found is a `DataConfigError`
  (the data set is incomplete); any other error is a `DataReadError` (try again later).

Each S3 request is bounded: 3 s to connect, 20 s without a byte while reading, two attempts
by botocore and none more by s3fs per read; so one read attempt ends within about a minute
even on a dead connection, well within the minutes of a collective timeout.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading

import fsspec

from ddpm_dist.utils.files import atomic_path, is_temp_file
from ddpm_dist.utils.urls import location_error

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The training data cannot be read; the message is one line that says why."""


class DataConfigError(DataError):
    """Wrong endpoint, bad credentials, missing bucket/index, empty shard list."""


class DataReadError(DataError):
    """A read still failed after all retries: the storage is unavailable, try again later."""


class BadDataError(DataError):
    """The data was read but is unusable: a shard with no decodable sample, or too many
    samples skipped."""


STARTUP_CONNECT_RETRIES = 1  # a refused connection at start-up is tried twice (then: wrong endpoint)


def _redact(text: str) -> str:
    # botocore messages may quote request details; never let a key value through.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value:
            text = text.replace(value, "***")
    return text.splitlines()[0][:300] if text else ""


def check_location(url: str) -> None:
    """A DataConfigError unless `url` is a local path or an s3:// URL: another scheme would reach
    fsspec without our endpoint, timeouts and retry cap, or be written as a local folder."""
    message = location_error(url, "data location")
    if message:
        raise DataConfigError(message)


def filesystem(url: str, endpoint: str | None = None):
    """(fs, path) for a URL; s3 clients fail fast on connect so a wrong endpoint shows in seconds."""
    check_location(url)
    options = {}
    if url.startswith("s3://"):
        options = {"config_kwargs": {"connect_timeout": 3, "read_timeout": 20,
                                     "retries": {"max_attempts": 2, "mode": "standard"}}}
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(url, **options)
    if url.startswith("s3://"):
        fs.retries = 1  # s3fs would retry a timed-out read 5 times; read_bytes retries, bounded
    return fs, path


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def describe(exc: BaseException, url: str) -> str:
    """One line naming the failure kind: what a user needs to fix it."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return f"{url}: not found (missing bucket or object): {_redact(str(exc))}"
    if isinstance(exc, PermissionError):
        return f"{url}: access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "Endpoint" in name or "Connect" in name or isinstance(exc, ConnectionError):
        return f"{url}: cannot connect to the storage endpoint ({name}; check AWS_ENDPOINT_URL " \
               f"or data.s3_endpoint)"
    return f"{url}: {name}: {_redact(str(exc))}"


def read_bytes(url: str, *, endpoint: str | None = None, retries: int = 5, wait: float = 1.0,
               check: bool = False, cancel: threading.Event | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    """The whole object, or its bytes [start, end) (one ranged GET on S3); transient errors
    retried with backoff wait, 2*wait, ... (cap 30 s).

    Setting `cancel` ends the retries at the next backoff wait with a DataReadError.
    """
    check_location(url)  # before the retries: no retry fixes it
    attempt = 0
    while True:
        try:
            fs, path = filesystem(url, endpoint)
            return fs.cat_file(path, start=start, end=end)
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as DataError
            error = _give_up(exc, url, attempt, retries, check)
            if error is not None:
                raise error from None
            delay = min(wait * 2 ** attempt, 30.0)
            log.warning("read failed (%s); retry %d/%d in %.1f s", describe(exc, url), attempt + 1,
                        retries, delay)
        if (cancel or threading.Event()).wait(delay):
            raise DataReadError(f"{url}: read abandoned (the stream was closed)")
        attempt += 1


def _give_up(exc: Exception, url: str, attempt: int, retries: int, check: bool) -> DataError | None:
    """The error to raise after failed attempt number `attempt` (from 0), or None to retry."""
    if check and _not_transient(exc):
        return DataConfigError(describe(exc, url))
    if check and _refused(exc) and attempt >= min(retries, STARTUP_CONNECT_RETRIES):
        return DataConfigError(describe(exc, url))
    if attempt < retries:
        return None
    kind = DataConfigError if isinstance(exc, FileNotFoundError) else DataReadError
    return kind(describe(exc, url))


def _causes(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _not_transient(exc: Exception) -> bool:
    """Missing object or bucket, access denied, a path that is a folder, an unknown host name."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return any(isinstance(e, socket.gaierror) for e in _causes(exc))


def _refused(exc: Exception) -> bool:
    """Nothing listens at the endpoint (not a timeout: those are retried in full)."""
    return type(exc).__name__ == "EndpointConnectionError" or \
        any(isinstance(e, ConnectionRefusedError) for e in _causes(exc))


def write_bytes(url: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Atomic write: a local temp file (mode from the user's umask), fsynced, renamed into
    place; or uploaded whole to S3."""
    fs, path = filesystem(url, endpoint)
    if url.startswith("s3://"):
        fs.pipe_file(path, data)  # an S3 PUT is atomic: readers see the old object or the new
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_temp_files(url: str) -> None:
    """Delete the temp files a killed writer left in a local folder (S3 has none)."""
    if url.startswith("s3://") or not os.path.isdir(url):
        return
    for name in os.listdir(url):
        if is_temp_file(name):
            os.unlink(os.path.join(url, name))


def exists(url: str, *, endpoint: str | None = None) -> bool:
    fs, path = filesystem(url, endpoint)
    return fs.exists(path)


def _gopen_s3(url, mode="rb", bufsize=8192, *, endpoint=None, **kw):
    """webdataset's opener for s3:// URLs: fsspec with the timeouts and endpoint of `filesystem`."""
    fs, path = filesystem(url, endpoint)
    return fs.open(path, mode)


def register_webdataset_s3(endpoint: str | None = None) -> None:
    """Let webdataset open s3:// URLs (it has no opener of its own) through fsspec.

    The opener is registered in this process only: loader workers started by fork inherit it,
    workers started by spawn or forkserver must call this again. A later call replaces the
    endpoint; None means AWS_ENDPOINT_URL from the environment.
    """
    try:
        import webdataset
    except ImportError:
        raise ImportError("webdataset is not installed (the 'webdataset' extra)") from None
    webdataset.gopen_schemes["s3"] = functools.partial(_gopen_s3, endpoint=endpoint)
