"""Reading and writing shard files through fsspec: local paths or s3:// URLs, with retries.

S3 settings come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
or an explicit endpoint from the config. Credentials are never put into messages: every error
we raise names the URL and the kind of failure only, and is scrubbed of the key values.

Two failure policies:
- `check=True` (opening index.json at start-up): configuration errors (missing bucket, bad
  credentials, wrong endpoint) are reported at once as one `DataError` line, not retried.
- mid-stream reads: every error is treated as transient (a restarting server answers with
  refused connections or missing buckets for a few seconds) and retried with exponential
  backoff before giving up with a `DataError`.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import fsspec

from ddpm_dist.utils.files import atomic_path, is_temp_file

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The training data cannot be read; the message is one line that says why."""


class DataConfigError(DataError):
    """Wrong endpoint, bad credentials, missing bucket/index, empty shard list."""


class DataReadError(DataError):
    """A read still failed after all retries."""


def _redact(text: str) -> str:
    # botocore messages may quote request details; never let a key value through.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value:
            text = text.replace(value, "***")
    return text.splitlines()[0][:300] if text else ""


def filesystem(url: str, endpoint: str | None = None):
    """(fs, path) for a URL; s3 clients fail fast on connect so a wrong endpoint shows in seconds."""
    options = {}
    if url.startswith("s3://"):
        options = {"config_kwargs": {"connect_timeout": 3, "read_timeout": 60,
                                     "retries": {"max_attempts": 2, "mode": "standard"}}}
        if endpoint:
            options["endpoint_url"] = endpoint
    return fsspec.core.url_to_fs(url, **options)


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
               check: bool = False) -> bytes:
    """The whole object; transient errors retried with backoff wait, 2*wait, ... (cap 30 s)."""
    for attempt in range(retries + 1):
        try:
            fs, path = filesystem(url, endpoint)
            return fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as DataError
            if check or attempt == retries:
                kind = DataConfigError if check else DataReadError
                raise kind(describe(exc, url)) from None
            delay = min(wait * 2 ** attempt, 30.0)
            log.warning("read failed (%s); retry %d/%d in %.1f s", describe(exc, url), attempt + 1,
                        retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(url: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Atomic write: a local temp file, fsynced, mode 0644 (readable by the training jobs of
    other users whatever the umask), renamed into place; or uploaded whole to S3."""
    fs, path = filesystem(url, endpoint)
    if url.startswith("s3://"):
        fs.pipe_file(path, data)  # an S3 PUT is atomic: readers see the old object or the new
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)


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
