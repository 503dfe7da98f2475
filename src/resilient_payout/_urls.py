"""URL helpers shared by storage backends, the service and the CLI."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url", "redact_urls_in"]

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: fit for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def redact_urls_in(text: str) -> str:
    """``text`` with the user information of every URL in it replaced by ``***``.

    For error messages that quote a URL (aiohttp puts the request URL in several of its own),
    since a partner URL may carry basic-auth credentials.
    """
    return _USERINFO.sub(r"\1***@", text)
