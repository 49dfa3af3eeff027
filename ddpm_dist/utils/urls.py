"""Credentials stay out of URLs: a URL is written to configs, checkpoints, logs and errors.

`credentials_error` finds a user name or password in the authority part of a URL
(`s3://KEY:SECRET@bucket/...`, `http://user:password@host:9000`) and returns one line that
names the setting and says where credentials go instead; the line never quotes the URL.
"""
from __future__ import annotations

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
