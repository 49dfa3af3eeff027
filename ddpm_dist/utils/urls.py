"""Paths and URLs a user gives: only what is honoured, nothing that could become code.

`credentials_error` finds a user name or password in the authority part of a URL
(`s3://KEY:SECRET@bucket/...`, `http://user:password@host:9000`) and returns one line that
names the setting and says where credentials go instead; the line never quotes the URL (a URL
is written to configs, checkpoints, logs and errors). `location_error` accepts a local path or
an `s3://` URL, the two the data layer gives every setting (endpoint, timeouts, retry cap);
`endpoint_error` an http(s) endpoint. `control_character_error` refuses a newline or any other
control character: a path ends up in job scripts (where a newline ends a `#SBATCH` line and
starts a command) and in file names.
"""
from __future__ import annotations

import re
import unicodedata

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

ENVIRONMENT = ("put credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
               "or a profile (AWS_PROFILE), not in the URL")


def _authority(url: str) -> str | None:
    """The part between `scheme://` and the next '/', or None for a plain path."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return None
    return rest.split("/", 1)[0]


def has_credentials(url: str) -> bool:
    """True when the URL carries a user name or password. A secret key may hold '/', which
    ends the authority early (`s3://KEY:SE/CRET@bucket`): a ':' in an S3 bucket name (none
    is allowed) or an '@' anywhere in an endpoint counts as well."""
    authority = _authority(url)
    if authority is None:
        return False
    if url.startswith("s3://"):
        return "@" in authority or ":" in authority
    return "@" in url


def credentials_error(url: str | None, setting: str) -> str | None:
    """One line for a URL with credentials in it (the URL itself is left out), else None."""
    if url and has_credentials(url):
        return f"{setting}: the URL holds credentials; {ENVIRONMENT}"
    return None


def control_character_error(text: str | None, setting: str) -> str | None:
    """One line for a value holding a control character (newline, CR, escape, ...), else None."""
    bad = next((c for c in text or "" if unicodedata.category(c) == "Cc"), None)
    if bad is None:
        return None
    return f"{setting}: holds the control character {bad!r}; paths and names must be printable text"


def location_error(url: str | None, setting: str) -> str | None:
    """One line unless `url` is a local path or an s3:// URL (credentials and control characters
    are refused too). A leading `word:` is taken for a scheme: `./a:b` names such a folder."""
    error = credentials_error(url, setting) or control_character_error(url, setting)
    if error or not url:
        return error
    scheme = _SCHEME.match(url)
    if scheme is None or url.startswith("s3://"):
        return None
    shown = scheme.group(0) + ("//" if url[scheme.end():].startswith("//") else "")
    return (f"{setting}: {shown} is not supported; give a local path or an s3://bucket/prefix "
            f"URL (other S3-compatible stores: s3:// with an endpoint setting)")


def endpoint_error(url: str | None, setting: str) -> str | None:
    """One line unless `url` is None or an http(s)://host[:port] endpoint."""
    error = credentials_error(url, setting) or control_character_error(url, setting)
    if error or not url or re.match(r"^https?://[^/]", url):
        return error
    return f"{setting}: must be an http:// or https:// endpoint (e.g. http://minio:9000)"
